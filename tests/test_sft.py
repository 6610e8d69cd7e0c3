"""Supervised format warm-up (deepretrieval.trainer.sft): masking, padded loss vs per-row reference,
a real run on the tiny model that lowers the loss and saves a loadable, resumable folder."""

import json

import pytest
import torch

from deepretrieval.models.tiny import make_tiny_qwen2, save_tiny_model
from deepretrieval.rewards.parsing import format_answer
from deepretrieval.trainer import sft


def test_tokenize_masks_prompt_and_appends_eos(tok):
    ex = sft.SFTExample("the prompt text", "<answer>x</answer>")
    ids, labels = sft.tokenize_example(tok, ex, max_length=256)
    n_prompt = len(tok("the prompt text", add_special_tokens=False)["input_ids"])
    target = tok("<answer>x</answer>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == tok("the prompt text", add_special_tokens=False)["input_ids"] + target
    assert labels == [sft.IGNORE_INDEX] * n_prompt + target
    # too long: the prompt is cut from the left, the target kept whole
    ids2, labels2 = sft.tokenize_example(tok, ex, max_length=len(target) + 1)
    assert len(ids2) == len(target) + 1 and labels2[1:] == target and labels2[0] == sft.IGNORE_INDEX
    with pytest.raises(ValueError):
        sft.tokenize_example(tok, ex, max_length=len(target))


def test_padded_windowed_loss_matches_per_row_reference(tok):
    model = make_tiny_qwen2(tokenizer=tok, hidden_size=32, num_layers=2, seed=3).eval()
    examples = [sft.SFTExample("short prompt", "<answer>a OR b</answer>"),
                sft.SFTExample("a much longer prompt with several more words in it", "<answer>q</answer>")]
    pairs = [sft.tokenize_example(tok, ex, 256) for ex in examples]
    batch = sft.collate(pairs, tok.pad_token_id)
    keep = sft.keep_positions(batch["labels"])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=keep).logits
        loss = sft.sft_loss(logits, batch["labels"][:, -keep:])
        # reference: each row alone, unpadded, full logits, -log p of each target token, mean over all
        nll = []
        for ids, labels in pairs:
            full = model(input_ids=torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(full, -1)
            for t in range(1, len(ids)):
                if labels[t] != sft.IGNORE_INDEX:
                    nll.append(-logp[t - 1, labels[t]])
        ref = torch.stack(nll).mean()
    assert keep < batch["input_ids"].shape[1]  # the prompt's logits are not computed
    assert torch.allclose(loss.double(), ref, atol=1e-4), (loss, ref)


def test_run_sft_learns_saves_and_skips(tmp_path, tok):
    base = save_tiny_model(tmp_path / "base", hidden_size=32, num_layers=2, seed=0)
    examples = [sft.SFTExample(f"question number {i}", format_answer(f"term{i % 3} OR other"))
                for i in range(8)]
    out = tmp_path / "warm"
    res = sft.run_sft(base, examples, out, epochs=15, lr=1e-2, batch_size=4, progress=False)
    assert res["steps"] == 30 and not res["skipped"]
    assert res["losses"][-1] < 0.5 * res["losses"][0]
    assert sft.sft_done(out)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert json.loads((out / "sft_losses.json").read_text())["examples"] == 8
    again = sft.run_sft(base, examples, out, epochs=6, lr=3e-3, batch_size=4, progress=False)
    assert again["skipped"] and again["steps"] == 0
    with pytest.raises(ValueError):
        sft.run_sft(base, [], tmp_path / "empty", progress=False)
