"""`python -m deepretrieval.trainer.main_ppo key=value ...` — the PPO trainer's entry point.

Configuration: Hydra over `config/ppo_trainer.yaml` (verl key names; see docs/configuration.md).
The override keys are checked before Hydra sees them, so a typo is reported with the key and a
suggestion; the composed config is then validated as a whole (batch arithmetic, names, resources).

Exit codes: 0 success, 2 configuration error, 1 run failure, 130 interrupted (Ctrl-C / SIGTERM).
Workers, placement groups and a Ray instance started here are cleaned up on every exit path.
A failure the trainer understands (a dead worker with no restart left, a damaged checkpoint named
for resume, the search service down for too many steps) is one line on stderr, no traceback.

Ray: `trainer.ray_init.address` or the `RAY_ADDRESS` environment variable connect to an existing
cluster (docs/scaling.md); otherwise a local Ray is started.
"""

from __future__ import annotations

import logging
import sys
from typing import List, Optional

from omegaconf import DictConfig, OmegaConf

from deepretrieval.controller.ray_utils import ControllerError
from deepretrieval.trainer.config import ConfigError, compose_config, validate_config
from deepretrieval.trainer.faults import RunFailed

logger = logging.getLogger("deepretrieval.trainer")


def run_ppo(config: DictConfig) -> dict:
    """Validate `config`, train, clean up; returns the last logged metrics."""
    from deepretrieval.trainer.ppo_trainer import PPOTrainer, install_sigterm_handler

    validate_config(config)
    install_sigterm_handler()
    trainer = PPOTrainer(config)
    try:
        return trainer.fit()
    finally:
        trainer.shutdown()


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print("Defaults and comments: deepretrieval/trainer/config/ppo_trainer.yaml; "
              "reference: docs/configuration.md. Print the composed config with --cfg.")
        return 0
    show_cfg = "--cfg" in argv
    argv = [a for a in argv if a != "--cfg"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        config = compose_config(argv, validate=not show_cfg)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # Hydra's grammar errors (bad quoting, bad list syntax)
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if show_cfg:
        from deepretrieval.trainer.tracking import redact_secrets

        print(OmegaConf.to_yaml(OmegaConf.create(redact_secrets(OmegaConf.to_container(config, resolve=False)))))
        return 0
    try:
        run_ppo(config)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logger.warning("interrupted; workers stopped")
        return 130
    except Exception as exc:
        from deepretrieval.trainer.checkpoint import IncompleteCheckpoint

        if isinstance(exc, (RunFailed, ControllerError, IncompleteCheckpoint)):
            logger.error("training failed: %s", exc)
            print(f"training failed: {exc}", file=sys.stderr)
            return 1
        logger.exception("training failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
