"""Writes the tiny random GPT-2 checkpoints under fixtures/models/ and HF's logits for them.

Each checkpoint covers one weight layout and some non-default config values:

- tiny-safetensors: save_pretrained's model.safetensors, `transformer.`-prefixed keys, tied LM head,
  HF defaults (gelu_new, eps 1e-5).
- tiny-bare-bin: pytorch_model.bin with the original release's bare `h.N.*` keys plus the
  `attn.bias` / `attn.masked_bias` buffers, n_inner 48, eps 1e-3, scale_attn_by_inverse_layer_idx,
  exact-erf gelu.
- tiny-sharded: sharded safetensors with model.safetensors.index.json, untied lm_head,
  reorder_and_upcast_attn, relu.

For each, golden_logits.safetensors holds a batch of prompts, the tokens fed at each decode step,
HF's logits at every prefill position and at every decode step (with HF's own KV cache).

Run from anywhere (needs torch, transformers, safetensors):
    python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch transformers safetensors
    /tmp/hfvenv/bin/python tools/model_goldens.py
"""

import json
import os
import shutil

import torch
import transformers
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "fixtures", "models")

BASE = dict(vocab_size=512, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=511, eos_token_id=511)

CHECKPOINTS = {
    "tiny-safetensors": dict(layout="safetensors", seed=1, config={}),
    "tiny-bare-bin": dict(
        layout="bare-bin",
        seed=2,
        config=dict(
            n_layer=3,
            n_inner=48,
            layer_norm_epsilon=1e-3,
            scale_attn_by_inverse_layer_idx=True,
            activation_function="gelu",
        ),
    ),
    "tiny-sharded": dict(
        layout="sharded",
        seed=3,
        config=dict(
            tie_word_embeddings=False,
            reorder_and_upcast_attn=True,
            activation_function="relu",
            n_head=2,
        ),
    ),
}


def randomize(model, seed):
    """Weights large enough that a wrong op moves the logits far past the tolerance."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.15 * torch.randn(param.shape, generator=gen))


def write_checkpoint(name, spec):
    path = os.path.join(OUT, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    config = GPT2Config(**{**BASE, **spec["config"]})
    torch.manual_seed(spec["seed"])
    model = GPT2LMHeadModel(config).eval()
    randomize(model, spec["seed"])
    if spec["layout"] == "safetensors":
        model.save_pretrained(path, safe_serialization=True)
    elif spec["layout"] == "sharded":
        model.save_pretrained(path, safe_serialization=True, max_shard_size="40KB")
        assert os.path.exists(os.path.join(path, "model.safetensors.index.json")), "expected shards"
    elif spec["layout"] == "bare-bin":
        model.config.save_pretrained(path)
        state = {}
        for key, value in model.state_dict().items():
            if key == "lm_head.weight":
                continue  # the original release has no lm_head: it is tied to wte
            state[key.removeprefix("transformer.")] = value.clone()
        n = config.n_positions
        for layer in range(config.n_layer):
            state[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
            state[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
    else:
        raise ValueError(spec["layout"])
    for extra in ("generation_config.json",):
        p = os.path.join(path, extra)
        if os.path.exists(p):
            os.remove(p)
    return path, model


def golden(path, model, seed):
    # Reload from disk so the goldens describe the files, not the in-memory model.
    model = GPT2LMHeadModel.from_pretrained(path).eval()
    gen = torch.Generator().manual_seed(100 + seed)
    vocab = model.config.vocab_size
    batch, prompt_len, steps = 2, 6 + seed, 4
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=gen)
    step_tokens = torch.randint(0, vocab, (steps, batch), generator=gen)
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        prefill = out.logits.float()
        past = out.past_key_values
        step_logits = []
        for s in range(steps):
            out = model(input_ids=step_tokens[s].view(batch, 1), past_key_values=past, use_cache=True)
            past = out.past_key_values
            step_logits.append(out.logits[:, -1, :].float())
    save_file(
        {
            "prompt": prompt.to(torch.int64).contiguous(),
            "step_tokens": step_tokens.to(torch.int64).contiguous(),
            "prefill_logits": prefill.contiguous(),
            "step_logits": torch.stack(step_logits).contiguous(),
        },
        os.path.join(path, "golden_logits.safetensors"),
        metadata={"transformers": transformers.__version__, "torch": torch.__version__},
    )


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, spec in CHECKPOINTS.items():
        path, model = write_checkpoint(name, spec)
        golden(path, model, spec["seed"])
        print(name, sorted(os.listdir(path)))
    print("transformers", transformers.__version__, "torch", torch.__version__)


if __name__ == "__main__":
    main()
