"""The PPO fit loop on a single controller (this process) driving worker groups.

Each training step is `deepretrieval.trainer.step.ppo_step` (the order of one step, and how samples
whose search was unavailable are left out of the update, are described there), driving this
trainer's worker groups: on Ray (`trainer.use_ray`) or in this process.

Validation (greedy by default, `rollout.val_kwargs`) runs before training (`val_before_train`),
every `test_freq` steps and after the last step, and reports the reward metrics per data source as
`val/<data_source>/<metric>` (e.g. `val/pubmed_mini/recall_mean`).

Checkpoints (`save_freq` and the last step) hold everything a resume needs; resuming from step k
of N reproduces the metrics of an uninterrupted run (the data order, the rollout sampling seeds,
every RNG, the optimiser, scheduler and KL-controller states are restored).

Faults (docs/reliability.md, "Checkpoints and worker faults"):
- a worker process that dies (or a call that times out) is reported with its rank, pid, node and
  the step; with `trainer.max_restarts=K` the worker groups are torn down, recreated and the run
  resumes from the latest complete checkpoint (or its start), at most K times; then, or with the
  default 0, the run stops with `RunFailed`, a one-line error;
- a step whose every sample had no search answer (`search_unavailable`) updates nothing and is
  counted as skipped; `trainer.max_consecutive_skipped_steps` such steps in a row stop the run.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from deepretrieval.protocol import Batch
from deepretrieval.seeding import get_rng_state, set_rng_state
from deepretrieval.trainer.checkpoint import (
    ACTOR_DIR,
    CRITIC_DIR,
    CheckpointManager,
    load_trainer_state,
    save_prompt_settings,
    save_trainer_state,
)
from deepretrieval.trainer.config import (ConfigError, build_worker_config, resolve_device, to_plain, uses_critic,
                                          uses_reference, world_size)
from deepretrieval.trainer.faults import RunFailed, is_restartable, skipped_steps_error
from deepretrieval.trainer.metrics import marked_timer
from deepretrieval.trainer.step import ppo_step
from deepretrieval.trainer.tracking import Tracking

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# data order


class PromptLoader:
    """Deterministic, resumable batching of a map-style dataset.

    Epoch e visits the prompts in the order `randperm(len, seed + e)` (or in file order without
    shuffling) in batches of `batch_size`; the position is `(epoch, batch index)`, so a resumed run
    continues with exactly the batch the interrupted one would have drawn next.
    """

    def __init__(self, dataset: Any, batch_size: int, collate_fn: Callable, shuffle: bool = True,
                 seed: int = 1, drop_last: bool = True):
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.collate_fn = collate_fn
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        n = len(dataset)
        self.batches_per_epoch = n // self.batch_size if drop_last else math.ceil(n / self.batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n} prompts cannot fill one batch of data.train_batch_size={batch_size} "
                             "(lower data.train_batch_size or set data.dataloader_drop_last=false)")
        self.epoch = 0
        self.batch_in_epoch = 0

    def order(self, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(len(self.dataset)))
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.dataset), generator=gen).tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch

    def next_batch(self) -> Dict[str, Any]:
        """The next batch, advancing (and wrapping into the next epoch) the position."""
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
        idx = self.order(self.epoch)[self.batch_in_epoch * self.batch_size:(self.batch_in_epoch + 1) * self.batch_size]
        self.batch_in_epoch += 1
        return self.collate_fn([self.dataset[i] for i in idx])

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])


def load_custom_reward_fn(path: Optional[str], name: str = "compute_score") -> Optional[Callable]:
    """verl's `custom_reward_function`: `name` from the python file at `path` (None without a path)."""
    if not path:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"custom_reward_function.path {path!r} does not exist")
    spec = importlib.util.spec_from_file_location("custom_reward_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    if not hasattr(module, name):
        raise AttributeError(f"custom_reward_function.name {name!r} not found in {path}")
    return getattr(module, name)


# ------------------------------------------------------------------------------------------------
# trainer


class PPOTrainer:
    """Builds the worker groups for `config` (validated) and runs `fit()`.

    `reward_fn` / `val_reward_fn` default to the search `RewardManager` built from the `reward`
    section (and `custom_reward_function`); datasets default to `RLHFDataset` over
    `data.train_files` / `data.val_files`.
    """

    def __init__(self, config: DictConfig, tokenizer: Any = None, reward_fn: Any = None, val_reward_fn: Any = None,
                 train_dataset: Any = None, val_dataset: Any = None, console_write: Optional[Callable[[str], None]] = None):
        self.config = config
        self.device = resolve_device(config)
        self.world_size = world_size(config)
        self.use_critic = uses_critic(config)
        self.use_reference = uses_reference(config)
        self.console_write = console_write
        t = config.trainer
        self.use_ray = self.world_size > 1 if t.use_ray == "auto" else bool(t.use_ray)
        if self.use_ray and importlib.util.find_spec("ray") is None:
            raise RuntimeError("trainer.use_ray needs the ray package (pip install 'ray[default]')")

        from deepretrieval.models.tokenizer import load_tokenizer

        if tokenizer is None:
            tok_path = config.data.tokenizer or config.actor_rollout_ref.model.path
            tokenizer = load_tokenizer(tok_path, padding_side="left",
                                       trust_remote_code=bool(config.actor_rollout_ref.model.trust_remote_code))
        self.tokenizer = tokenizer

        if reward_fn is None or val_reward_fn is None:
            from deepretrieval.rewards.manager import RewardManager

            try:
                custom = load_custom_reward_fn(config.custom_reward_function.path, config.custom_reward_function.name)
            except (OSError, AttributeError, SyntaxError, ImportError) as exc:
                raise ConfigError("custom_reward_function.path", str(exc)) from None
            from deepretrieval.rewards.overlong import OverlongBuffer

            reward_cfg = to_plain(config.reward)
            overlong = OverlongBuffer.from_config(to_plain(config.reward_model.get("overlong_buffer")),
                                                  int(config.data.max_response_length))
            try:
                if reward_fn is None:
                    reward_fn = RewardManager(tokenizer, reward_cfg, compute_score=custom, num_examine=0,
                                              overlong=overlong)
                if val_reward_fn is None:
                    val_reward_fn = RewardManager(tokenizer, reward_cfg, compute_score=custom,
                                                  num_examine=int(t.log_val_generations or 0), overlong=overlong)
            except (ValueError, KeyError, TypeError) as exc:  # the reward section is checked by its owner
                raise ConfigError("reward", str(exc)) from None
        self.reward_fn, self.val_reward_fn = reward_fn, val_reward_fn

        from deepretrieval.data.dataset import RLHFDataset, collate_fn

        self.collate_fn = collate_fn
        self.train_dataset = train_dataset if train_dataset is not None else RLHFDataset(
            list(_as_list(config.data.train_files)), tokenizer, config.data)
        if val_dataset is None and config.data.val_files:
            val_dataset = RLHFDataset(list(_as_list(config.data.val_files)), tokenizer, config.data)
        self.val_dataset = val_dataset
        self.loader = PromptLoader(self.train_dataset, config.data.train_batch_size, collate_fn,
                                   shuffle=bool(config.data.shuffle), seed=int(config.data.seed),
                                   drop_last=bool(config.data.dataloader_drop_last))
        self.total_training_steps = len(self.loader) * int(t.total_epochs)
        if t.total_training_steps is not None:
            self.total_training_steps = int(t.total_training_steps)


        from deepretrieval.algorithms.core_algos import get_kl_controller

        self.kl_ctrl = get_kl_controller(config.algorithm.kl_ctrl)
        self.ckpt = CheckpointManager(t.default_local_dir, t.max_actor_ckpt_to_keep)
        self.global_step = 0
        self.actor_wg = self.critic_wg = None
        self._pool = None
        self._ray_started = False
        self._search_service = False  # reward_model.search_service started by this trainer
        self.actor_worker_info: Any = None
        self.tracker: Optional[Tracking] = None

    # ---------------------------------------------------------------------------- workers
    def init_workers(self) -> None:
        from deepretrieval.workers.fsdp_workers import ActorRolloutRefWorker, CriticWorker

        cfg = build_worker_config(self.config, self.total_training_steps)
        t = self.config.trainer
        start_timeout = float(t.ray_init.timeout_s)
        if not self.use_ray:
            from deepretrieval.controller.worker_group import LocalWorkerGroup

            self.actor_wg = LocalWorkerGroup(ActorRolloutRefWorker, args=(cfg, self.use_reference), device=self.device,
                                             name_prefix="actor_rollout_ref")
            if self.use_critic:
                self.critic_wg = LocalWorkerGroup(CriticWorker, args=(cfg,), device=self.device, name_prefix="critic")
        else:
            from deepretrieval.controller.ray_utils import init_ray
            from deepretrieval.controller.resource_pool import ResourcePool
            from deepretrieval.controller.worker_group import RayWorkerGroup

            self._ray_started = init_ray(address=t.ray_init.address, num_cpus=t.ray_init.num_cpus,
                                         node_ip_address=t.ray_init.get("node_ip_address")) or self._ray_started
            if _SIGTERM["wanted"]:
                install_sigterm_handler()  # over the handler ray.init put in place
            self._pool = ResourcePool([int(t.n_gpus_per_node)] * int(t.nnodes), use_gpu=self.device == "cuda",
                                      max_colocate_count=2 if self.use_critic else 1, name_prefix="ppo")
            self._pool.create(timeout_s=start_timeout)
            threads = 0 if self.device == "cuda" else 1  # one CPU slot per worker process
            common = dict(start_timeout_s=start_timeout, call_timeout_s=float(t.call_timeout_s), num_threads=threads)
            self.actor_wg = RayWorkerGroup(self._pool, ActorRolloutRefWorker, args=(cfg, self.use_reference),
                                           name_prefix="actor_rollout_ref", **common)
            if self.use_critic:
                self.critic_wg = RayWorkerGroup(self._pool, CriticWorker, args=(cfg,), name_prefix="critic", **common)
        self._start_search_service()
        info = self.actor_wg.init_model()
        # per rank: parameter counts, FSDP2, LoRA and how the reference is held ("copy" |
        # "actor_adapter_disabled" with LoRA, where no reference model is built | None)
        self.actor_worker_info = info
        logger.info("actor workers ready: %s", info)
        if self.critic_wg is not None:
            self.critic_wg.init_model()

    def _start_search_service(self) -> None:
        """reward_model.search_service: the reward's engines served by Ray actors (Ray started here
        when the workers run in-process); idempotent, so a restart keeps the running replicas."""
        from deepretrieval.search.service import settings_from_config

        settings = settings_from_config(self.config.reward_model.get("search_service"))
        if settings is None:
            return
        from deepretrieval.controller.ray_utils import init_ray
        from deepretrieval.rewards.literature import use_search_service

        t = self.config.trainer
        self._ray_started = init_ray(address=t.ray_init.address, num_cpus=t.ray_init.num_cpus,
                                     node_ip_address=t.ray_init.get("node_ip_address")) or self._ray_started
        if _SIGTERM["wanted"]:
            install_sigterm_handler()  # over the handler ray.init put in place
        use_search_service(settings)
        self._search_service = True

    def worker_info(self) -> List[Dict[str, Any]]:
        """Per worker process: group, rank, pid, node id and IP (empty in-process)."""
        out = []
        for wg in (self.actor_wg, self.critic_wg):
            for w in getattr(wg, "worker_info", None) or []:
                out.append(dict(w, group=wg.name_prefix))
        return out

    def shutdown_workers(self) -> None:
        """Stop the worker groups and release their placement groups (Ray itself stays up)."""
        for wg in (self.actor_wg, self.critic_wg):
            if wg is not None:
                try:
                    wg.shutdown()
                except Exception:
                    logger.exception("worker group shutdown failed")
        self.actor_wg = self.critic_wg = None
        if self._pool is not None:
            self._pool.remove()
            self._pool = None

    def shutdown(self) -> None:
        self.shutdown_workers()
        if self._search_service:
            from deepretrieval.rewards.literature import use_search_service

            use_search_service(None)  # kills the replicas this process started
            self._search_service = False
        if self._ray_started:
            from deepretrieval.controller.ray_utils import shutdown_ray

            shutdown_ray(True)
            self._ray_started = False
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None

    # ---------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        tmp = self.ckpt.begin(self.global_step)
        try:
            self.actor_wg.save_checkpoint(str(tmp / ACTOR_DIR), save_hf=bool(self.config.trainer.save_hf_model))
            if self.critic_wg is not None:
                self.critic_wg.save_checkpoint(str(tmp / CRITIC_DIR))
            save_prompt_settings(tmp, self.train_dataset)
            save_trainer_state(tmp, {
                "global_step": self.global_step,
                "loader": self.loader.state_dict(),
                "kl_ctrl": self.kl_ctrl.state_dict(),
                "rng": get_rng_state(),
                "total_training_steps": self.total_training_steps,
            })
        except BaseException:
            self.ckpt.abort(tmp)
            raise
        final = self.ckpt.commit(tmp, self.global_step)
        logger.info("saved checkpoint %s", final)
        return final

    def load_checkpoint(self, path: Optional[Path] = None) -> Optional[Path]:
        """Load `path`, or the checkpoint `trainer.resume_mode` names (None: nothing loaded)."""
        t = self.config.trainer
        self.ckpt.clean_stale()
        if path is None:
            path = self.ckpt.resolve_resume(str(t.resume_mode), t.resume_from_path)
        if path is None:
            return None
        self._resumed_from = path
        logger.info("resuming from %s", path)
        self.actor_wg.load_checkpoint(str(path / ACTOR_DIR))
        if self.critic_wg is not None:
            if not (path / CRITIC_DIR).is_dir():
                raise FileNotFoundError(f"{path} holds no critic state but this run trains a critic")
            self.critic_wg.load_checkpoint(str(path / CRITIC_DIR))
        state = load_trainer_state(path)
        self.global_step = int(state["global_step"])
        self.loader.load_state_dict(state["loader"])
        self.kl_ctrl.load_state_dict(state["kl_ctrl"])
        set_rng_state(state["rng"])
        return path

    # ---------------------------------------------------------------------------- validation
    def _val_batches(self) -> Iterator[Batch]:
        n = len(self.val_dataset)
        size = int(self.config.data.val_batch_size or n)
        for start in range(0, n, size):
            items = [self.val_dataset[i] for i in range(start, min(start + size, n))]
            yield Batch.from_single_dict(self.collate_fn(items))

    def validate(self) -> Dict[str, float]:
        """Greedy (val_kwargs) generation over the validation set; reward metrics per data source."""
        if self.val_dataset is None or len(self.val_dataset) == 0:
            return {}
        results: List[Dict[str, Any]] = []
        data_sources: List[str] = []
        lengths: List[float] = []
        samples: List[tuple] = []
        for batch in self._val_batches():
            batch.meta_info.update({"validate": True, "do_sample": False, "seed": 0})
            out = self.actor_wg.generate_sequences(batch)
            reward = self.val_reward_fn(out, return_dict=True)
            extra = reward["reward_extra_info"]
            keys = list(extra.keys())
            scores = reward["reward_tensor"].sum(-1).tolist()
            for i in range(len(out)):
                row = {k: extra[k][i] for k in keys}
                row["score"] = scores[i] if row.get("score") is None else row["score"]
                results.append(row)
            data_sources.extend(str(d) for d in out.non_tensor_batch.get("data_source", ["unknown"] * len(out)))
            lengths.extend(out.batch["response_mask"].sum(-1).float().tolist())
            if len(samples) < int(self.config.trainer.log_val_generations or 0):
                texts, _ = self.val_reward_fn.decode_responses(out) if hasattr(self.val_reward_fn, "decode_responses") else ([], [])
                samples.extend((t, s) for t, s in zip(texts, scores))
        from deepretrieval.rewards.manager import compute_reward_metrics

        metrics: Dict[str, float] = {}
        for key, value in compute_reward_metrics(results, prefix="val/").items():
            metrics[key] = value
        by_source: Dict[str, List[int]] = {}
        for i, ds in enumerate(data_sources):
            by_source.setdefault(ds, []).append(i)
        for ds, idx in sorted(by_source.items()):
            metrics.update(compute_reward_metrics([results[i] for i in idx], prefix=f"val/{ds}/"))
            metrics[f"val/{ds}/score_mean"] = float(np.mean([results[i]["score"] for i in idx]))
            metrics[f"val/{ds}/response_length_mean"] = float(np.mean([lengths[i] for i in idx]))
            metrics[f"val/test_score/{ds}"] = metrics[f"val/{ds}/score_mean"]  # verl's name
        for text, score in samples[: int(self.config.trainer.log_val_generations or 0)]:
            logger.info("[val sample] score=%.3f %r", score, text[:300])
        return metrics

    # ---------------------------------------------------------------------------- fit
    def fit(self) -> Dict[str, float]:
        """Train until `total_training_steps`; returns the metrics of the last step. Worker failures
        are handled as the module docstring says."""
        cfg = self.config
        t = cfg.trainer
        log_dir = t.log_dir or os.path.join(str(t.default_local_dir), "logs")
        if self.actor_wg is None:
            self.init_workers()
        self.load_checkpoint()
        if self.tracker is None:
            self.tracker = Tracking(t.project_name, t.experiment_name, list(_as_list(t.logger)),
                                    config=OmegaConf.to_container(cfg, resolve=True), log_dir=log_dir,
                                    console_write=self.console_write)
        last: Dict[str, float] = {}
        if self.val_dataset is not None and (t.val_before_train or t.val_only):
            val = self.validate()
            self.tracker.log(val, step=self.global_step)
            last.update(val)
            if t.val_only:
                return last
        if self.global_step >= self.total_training_steps:
            logger.info("nothing to do: step %d of %d already reached", self.global_step, self.total_training_steps)
            return last
        start_state = self._driver_state()
        restarts, max_restarts = 0, int(t.max_restarts or 0)
        while True:
            try:
                return self._train(last, restarts)
            except Exception as exc:
                if not is_restartable(exc):
                    raise
                where = f"step {self._running_step} ({self._phase})"
                logger.error("worker failure at %s: %s", where, exc)
                if restarts >= max_restarts:
                    latest = self.ckpt.latest(checksums=False)
                    raise RunFailed(f"{where}: {exc}; no restart left (trainer.max_restarts={max_restarts}); "
                                    f"last complete checkpoint: {latest or 'none'}") from None
                restarts += 1
                logger.warning("restart %d of %d: recreating the workers and resuming", restarts, max_restarts)
                self._restart(start_state)

    def _driver_state(self) -> Dict[str, Any]:
        """What the driver needs to restart from the current position without a checkpoint."""
        return {"global_step": self.global_step, "loader": self.loader.state_dict(),
                "kl_ctrl": self.kl_ctrl.state_dict(), "rng": get_rng_state()}

    def _restart(self, start_state: Dict[str, Any]) -> None:
        """Tear the worker groups down, build them again and continue from the latest complete
        checkpoint, or from where this `fit` started when there is none (the workers then hold the
        initial weights again)."""
        self.shutdown_workers()
        self.init_workers()
        # this run's newest complete checkpoint; else the one it started from (resume_mode=<path>)
        path = self.ckpt.latest() or self._resumed_from
        if path is not None and int(load_trainer_state(path)["global_step"]) < int(start_state["global_step"]):
            path = self._resumed_from
        if path is not None:
            self.load_checkpoint(path)
        else:
            self.global_step = int(start_state["global_step"])
            self.loader.load_state_dict(start_state["loader"])
            self.kl_ctrl.load_state_dict(start_state["kl_ctrl"])
            set_rng_state(start_state["rng"])
        logger.info("resumed at step %d after a worker failure", self.global_step)

    _running_step = 0
    _phase = "start"
    _resumed_from: Optional[Path] = None

    def _train(self, last: Dict[str, float], restarts: int) -> Dict[str, float]:
        from tqdm import tqdm

        t = self.config.trainer
        limit = t.get("max_consecutive_skipped_steps", None)
        skipped_in_a_row, skipped_total = 0, 0
        bar = tqdm(total=self.total_training_steps, initial=self.global_step, desc="Training", unit="step",
                   disable=None, dynamic_ncols=True)
        try:
            while self.global_step < self.total_training_steps:
                epoch = self.loader.epoch if self.loader.batch_in_epoch < len(self.loader) else self.loader.epoch + 1
                batch = Batch.from_single_dict(self.loader.next_batch())
                self._running_step, self._phase = self.global_step + 1, "training"
                metrics = ppo_step(batch, self.global_step, self.actor_wg, self.critic_wg, self.reward_fn,
                                   self.config, self.kl_ctrl)
                self.global_step += 1
                last_step = self.global_step >= self.total_training_steps
                metrics["train/epoch"] = float(epoch)
                metrics["train/global_step"] = float(self.global_step)
                skipped = metrics.get("train/step_skipped", 0.0) > 0
                skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
                skipped_total += int(skipped)
                metrics["train/skipped_steps"] = float(skipped_total)
                metrics["train/worker_restarts"] = float(restarts)
                if self.val_dataset is not None and (last_step or (t.test_freq > 0 and self.global_step % t.test_freq == 0)):
                    self._phase = "validation"
                    with marked_timer("testing", timings := {}):
                        metrics.update(self.validate())
                    metrics["timing_s/testing"] = timings["testing"]
                if t.save_freq != 0 and (last_step or (t.save_freq > 0 and self.global_step % t.save_freq == 0)):
                    self._phase = "checkpoint save"
                    start = time.perf_counter()
                    self.save_checkpoint()
                    metrics["timing_s/save_checkpoint"] = time.perf_counter() - start
                self.tracker.log(metrics, step=self.global_step)
                bar.update(1)
                last = metrics
                if limit is not None and skipped_in_a_row >= int(limit):
                    raise skipped_steps_error(skipped_in_a_row, self.global_step)
        finally:
            bar.close()
        return last


def _as_list(value: Any) -> List[Any]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [value]
    return list(value)


_SIGTERM = {"wanted": False}


def install_sigterm_handler() -> None:
    """SIGTERM (e.g. from a scheduler) ends the run like Ctrl-C, so workers are cleaned up.

    `ray.init` installs Ray's own fatal-signal handler, which aborts the process on SIGTERM
    (exit by SIGABRT, no cleanup); the trainer therefore installs this one again after Ray is up."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    _SIGTERM["wanted"] = True
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        pass
