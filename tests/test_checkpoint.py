"""Checkpoint folders (atomic commit, latest pointer, keep-last-N, resume resolution), RNG state,
the resumable prompt order, and the model/optimiser/HF-export helpers of workers/fsdp.py."""

import json
import logging
import random
import zlib

import numpy as np
import pytest
import torch

from deepretrieval.trainer.checkpoint import (
    LATEST_FILE,
    MARKER,
    TRAINER_STATE,
    CheckpointManager,
    IncompleteCheckpoint,
    load_trainer_state,
    resolve_model_dir,
    save_trainer_state,
)
from deepretrieval.seeding import get_rng_state, set_rng_state
from deepretrieval.trainer.ppo_trainer import PromptLoader


def commit_step(mgr, step, payload="x"):
    tmp = mgr.begin(step)
    (tmp / "part.txt").write_text(payload)
    (tmp / "actor").mkdir()
    (tmp / "actor" / "model.bin").write_bytes(bytes(range(256)) * 8)
    save_trainer_state(tmp, {"global_step": step})
    return mgr.commit(tmp, step)


def test_commit_is_a_rename_with_pointer_and_pruning(tmp_path):
    mgr = CheckpointManager(tmp_path, max_to_keep=2)
    tmp = mgr.begin(1)
    assert tmp.name.startswith(".tmp_global_step_1") and mgr.latest() is None  # invisible until commit
    (tmp / "part.txt").write_text("one")
    save_trainer_state(tmp, {"global_step": 1})
    assert mgr.commit(tmp, 1) == tmp_path / "global_step_1" and not tmp.exists()
    for step in (2, 3):
        commit_step(mgr, step)
    assert mgr.list_steps() == [2, 3]  # keep-last-2
    assert (tmp_path / LATEST_FILE).read_text() == "3"
    assert mgr.latest() == tmp_path / "global_step_3"
    commit_step(mgr, 3, payload="again")  # re-saving a step replaces it
    assert (tmp_path / "global_step_3" / "part.txt").read_text() == "again"


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path)
    commit_step(mgr, 1)
    tmp = mgr.begin(2)
    (tmp / "half").write_text("...")  # the run dies here
    assert mgr.latest() == tmp_path / "global_step_1"
    mgr.clean_stale()
    assert not tmp.exists()
    mgr.abort(mgr.begin(3))
    assert mgr.list_steps() == [1]


def test_marker_lists_every_file_with_size_and_crc(tmp_path):
    mgr = CheckpointManager(tmp_path)
    final = commit_step(mgr, 5)
    marker = json.loads((final / MARKER).read_text())
    assert marker["step"] == 5
    assert sorted(marker["files"]) == ["actor/model.bin", "part.txt", TRAINER_STATE]
    blob = bytes(range(256)) * 8
    assert marker["files"]["actor/model.bin"] == {"size": 2048, "crc32": zlib.crc32(blob)}
    assert marker["files"]["part.txt"] == {"size": 1, "crc32": zlib.crc32(b"x")}
    # a checkpoint without trainer_state.pt is never committed
    tmp = mgr.begin(6)
    (tmp / "part.txt").write_text("x")
    with pytest.raises(IncompleteCheckpoint, match="trainer_state.pt not written"):
        mgr.commit(tmp, 6)
    assert mgr.list_steps() == [5]


def _damage(path, how):
    if how == "empty":
        for child in sorted(path.rglob("*"), key=lambda p: -len(p.parts)):
            child.unlink() if child.is_file() else child.rmdir()
    elif how == "no_trainer_state":
        (path / TRAINER_STATE).unlink()
    elif how == "no_marker":
        (path / MARKER).unlink()
    elif how == "truncated_state":
        data = (path / TRAINER_STATE).read_bytes()
        (path / TRAINER_STATE).write_bytes(data[: len(data) // 2])
    elif how == "truncated_shard":
        data = (path / "actor" / "model.bin").read_bytes()
        (path / "actor" / "model.bin").write_bytes(data[:-1])
    elif how == "flipped_byte":  # same size, different content: only the checksum sees it
        data = bytearray((path / "actor" / "model.bin").read_bytes())
        data[100] ^= 0xFF
        (path / "actor" / "model.bin").write_bytes(bytes(data))
    elif how == "bad_marker":
        (path / MARKER).write_text("{not json")


DAMAGES = ["empty", "no_trainer_state", "no_marker", "truncated_state", "truncated_shard", "flipped_byte",
           "bad_marker"]
REASONS = {"empty": "is empty", "no_trainer_state": "lacks trainer_state.pt", "no_marker": "no completion marker",
           "truncated_state": "trainer_state.pt has", "truncated_shard": "actor/model.bin has 2047 bytes",
           "flipped_byte": "checksum", "bad_marker": "unreadable"}


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, how, caplog):
    mgr = CheckpointManager(tmp_path)
    commit_step(mgr, 1)
    commit_step(mgr, 2)
    _damage(tmp_path / "global_step_2", how)
    assert (tmp_path / LATEST_FILE).read_text() == "2"  # the pointer still names the damaged one
    with caplog.at_level(logging.WARNING, logger="deepretrieval.trainer.checkpoint"):
        assert mgr.resolve_resume("auto") == tmp_path / "global_step_1"
    assert any("global_step_2" in r.getMessage() and REASONS[how] in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
    # named explicitly, a damaged checkpoint is an error, not a silent fallback
    with pytest.raises(IncompleteCheckpoint, match="not complete"):
        mgr.resolve_resume(str(tmp_path / "global_step_2"))
    # every checkpoint damaged: a fresh start, not a crash
    _damage(tmp_path / "global_step_1", how)
    assert mgr.resolve_resume("auto") is None


def test_a_folder_renamed_without_marker_is_never_resumed(tmp_path):
    """A half-written checkpoint that reached its final name (a save killed between the rename of
    an older tool and its pointer, or a copy interrupted by hand) is skipped by resume_mode=auto."""
    mgr = CheckpointManager(tmp_path, max_to_keep=1)
    commit_step(mgr, 3)
    half = tmp_path / "global_step_7"
    (half / "actor").mkdir(parents=True)
    (half / "actor" / "model.bin").write_bytes(b"partial")
    (half / TRAINER_STATE).write_bytes(b"partial")
    assert mgr.latest() == tmp_path / "global_step_3"
    # pruning counts complete checkpoints only: the damaged step 7 does not push step 3 out ...
    assert mgr.prune() == []
    # ... and the next complete save (step 4, after resuming from 3) is kept
    commit_step(mgr, 4)
    assert mgr.latest() == tmp_path / "global_step_4" and not (tmp_path / "global_step_3").exists()


def test_latest_tolerates_a_lagging_or_broken_pointer(tmp_path):
    mgr = CheckpointManager(tmp_path)
    commit_step(mgr, 1)
    commit_step(mgr, 2)
    (tmp_path / LATEST_FILE).write_text("1")  # died between rename and pointer write
    assert mgr.latest() == tmp_path / "global_step_2"
    (tmp_path / LATEST_FILE).write_text("garbage")
    assert mgr.latest() == tmp_path / "global_step_2"
    (tmp_path / LATEST_FILE).write_text("9")  # names a deleted folder
    assert mgr.latest() == tmp_path / "global_step_2"


def test_resolve_resume(tmp_path):
    run = tmp_path / "run"
    mgr = CheckpointManager(run)
    assert mgr.resolve_resume("auto") is None  # nothing to resume: fresh start
    commit_step(mgr, 4)
    commit_step(mgr, 6)
    assert mgr.resolve_resume("disable") is None
    assert mgr.resolve_resume("auto") == run / "global_step_6"
    assert mgr.resolve_resume(str(run / "global_step_4")) == run / "global_step_4"
    assert mgr.resolve_resume("resume_path", str(run / "global_step_4")) == run / "global_step_4"
    assert CheckpointManager(tmp_path / "other").resolve_resume(str(run)) == run / "global_step_6"
    with pytest.raises(FileNotFoundError, match="global_step"):
        mgr.resolve_resume(str(tmp_path))


def test_rng_state_roundtrip_and_trainer_state(tmp_path):
    state = get_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])
    save_trainer_state(tmp_path, {"global_step": 3, "rng": state, "loader": {"epoch": 1}})
    loaded = load_trainer_state(tmp_path)
    assert loaded["global_step"] == 3 and loaded["loader"] == {"epoch": 1}


def test_prompt_loader_order_and_resume():
    data = list(range(10))
    collate = list
    a = PromptLoader(data, 3, collate, shuffle=True, seed=7)
    assert len(a) == 3  # drop_last
    straight = [a.next_batch() for _ in range(5)]  # crosses into epoch 1
    epoch0 = torch.randperm(10, generator=torch.Generator().manual_seed(7)).tolist()
    epoch1 = torch.randperm(10, generator=torch.Generator().manual_seed(8)).tolist()
    assert straight[:3] == [epoch0[0:3], epoch0[3:6], epoch0[6:9]]
    assert straight[3:] == [epoch1[0:3], epoch1[3:6]]
    b = PromptLoader(data, 3, collate, shuffle=True, seed=7)
    for _ in range(2):
        b.next_batch()
    c = PromptLoader(data, 3, collate, shuffle=True, seed=7)
    c.load_state_dict(b.state_dict())
    assert [c.next_batch() for _ in range(3)] == straight[2:]
    assert PromptLoader(data, 4, collate, shuffle=False, drop_last=False).order(0) == data
    with pytest.raises(ValueError, match="train_batch_size=11"):
        PromptLoader(data, 11, collate)


def test_sharded_save_load_and_hf_export_single_process(tmp_path):
    from transformers import AutoModelForCausalLM

    from deepretrieval.models.tiny import load_tiny_tokenizer, make_tiny_qwen2
    from deepretrieval.workers.fsdp import export_hf, load_sharded, save_sharded, tied_output_keys

    tok = load_tiny_tokenizer()
    model = make_tiny_qwen2(tok, hidden_size=32, num_layers=1, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 100, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    save_sharded(tmp_path / "ck", model, opt)

    other = make_tiny_qwen2(tok, hidden_size=32, num_layers=1, seed=1)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-2)
    load_sharded(tmp_path / "ck", other, other_opt)
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(p, q), name
    # the optimiser state came back too: one more identical step keeps them identical
    for m, o in ((model, opt), (other, other_opt)):
        m(input_ids=ids, labels=ids).loss.backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))

    assert tied_output_keys(model) == {"lm_head.weight"}
    out = export_hf(model, tmp_path / "hf", tok)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and (tmp_path / "hf" / "generation_config.json").is_file()


def test_hf_export_in_the_checkpoint_precision(tmp_path):
    import json

    from safetensors.torch import load_file

    from deepretrieval.models.tiny import load_tiny_tokenizer, make_tiny_qwen2
    from deepretrieval.workers.fsdp import export_hf

    tok = load_tiny_tokenizer()
    model = make_tiny_qwen2(tok, hidden_size=32, num_layers=1)  # fp32 master weights, as trained
    out = export_hf(model, tmp_path / "hf", tok, dtype=torch.bfloat16)
    weights = load_file(f"{out}/model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert "lm_head.weight" not in weights  # tied to the embedding: stored once
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    emb = model.get_input_embeddings().weight.detach()
    assert torch.equal(weights["model.embed_tokens.weight"], emb.to(torch.bfloat16))


# ------------------------------------------------------------------ FSDP2 over gloo, 2 processes

def _ids():
    gen = torch.Generator().manual_seed(3)
    return torch.randint(5, 300, (4, 10), generator=gen)


def _one_step(model, ids):
    from deepretrieval.workers.logprob import response_log_probs

    mask = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    lp, _ = response_log_probs(model, ids, mask, pos, 4)
    (-lp.mean()).backward()
    opt.step()


def _fsdp_rank(rank, world, store, out):
    import torch.distributed as dist

    from deepretrieval.models.tiny import make_tiny_qwen2
    from deepretrieval.workers.fsdp import apply_fsdp2, full_state_dict, unsharded_for_generation

    torch.set_num_threads(1)
    # a file rendezvous: no port that another process could take between picking and binding
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = apply_fsdp2(make_tiny_qwen2(hidden_size=32, num_layers=2, seed=0))
        local = _ids()[rank * 2:(rank + 1) * 2]
        with torch.no_grad(), unsharded_for_generation(model):  # ranks run different numbers of forwards
            for _ in range(rank + 1):
                model(input_ids=local)
        _one_step(model, local)
        state = full_state_dict(model)
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_ranks_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    from deepretrieval.models.tiny import make_tiny_qwen2

    out = tmp_path / "fsdp_state.pt"
    mp.spawn(_fsdp_rank, args=(2, str(tmp_path / "rendezvous"), str(out)), nprocs=2, join=True)
    sharded = torch.load(out)
    reference = make_tiny_qwen2(hidden_size=32, num_layers=2, seed=0)
    _one_step(reference, _ids())  # the whole batch in one process
    expected = reference.state_dict()
    initial = make_tiny_qwen2(hidden_size=32, num_layers=2, seed=0).state_dict()
    assert set(sharded) >= set(k for k in expected if k != "lm_head.weight")
    moved = 0
    for key, value in sharded.items():
        assert torch.allclose(value, expected[key], atol=1e-5), key
        moved += not torch.equal(value, initial[key])
    assert moved > 10  # the step changed the weights, identically in both set-ups


def test_resolve_model_dir(tmp_path):
    hf = tmp_path / "ckpt" / "global_step_7" / "actor" / "huggingface"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text("{}")
    (tmp_path / "ckpt" / "global_step_3" / "actor" / "huggingface").mkdir(parents=True)
    (tmp_path / "ckpt" / "global_step_3" / "actor" / "huggingface" / "config.json").write_text("{}")
    assert resolve_model_dir(tmp_path / "ckpt") == hf
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("3")
    assert resolve_model_dir(tmp_path / "ckpt").parts[-3] == "global_step_3"
    assert resolve_model_dir(hf.parent.parent) == hf
    assert resolve_model_dir(hf) == hf
    with pytest.raises(FileNotFoundError):
        resolve_model_dir(tmp_path / "missing")
    other = tmp_path / "exported" / "actor" / "hf"  # a folder exported by another tool
    other.mkdir(parents=True)
    (other / "config.json").write_text("{}")
    assert resolve_model_dir(tmp_path / "exported") == other
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither"):
        resolve_model_dir(tmp_path / "empty")
