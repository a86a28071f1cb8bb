"""Writes HF transformers' generation goldens under fixtures/generation/.

- fixtures/models/tiny-eos/: a tiny random GPT-2 (vocab 512, EOS = 511) whose EOS is likely, so
  that sequences and beams end early.
- fixtures/generation/search_goldens.json: greedy and beam search outputs of HF `generate()` on
  tiny-eos and tiny-safetensors (written by tools/model_goldens.py) for prompts of several
  lengths, num_beams 1-6, no_repeat_ngram_size 0/2/3 and num_return_sequences up to num_beams.
- fixtures/generation/warper_goldens.safetensors (+ .json): logits rows and, for several
  (temperature, top_k, top_p), the next-token distribution after HF's warpers
  (TemperatureLogitsWarper → TopKLogitsWarper → TopPLogitsWarper → softmax).
- fixtures/generation/repetition_goldens.json: greedy and beam search outputs of HF `generate()`
  with `repetition_penalty` (0.8 to 3.0), some combined with no_repeat_ngram_size (beam) and
  min_new_tokens, on the same two checkpoints.

Run after tools/model_goldens.py (needs torch, transformers, safetensors):
    /tmp/hfvenv/bin/python tools/generation_goldens.py
`--only NAME` (repeatable: eos-checkpoint, search, warper, repetition) writes only those; e.g.
    /tmp/hfvenv/bin/python tools/generation_goldens.py --only repetition
leaves the checkpoint and the other goldens untouched.
"""

import argparse
import json
import os
import shutil

import torch
import transformers
from safetensors.torch import save_file
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODELS = os.path.join(ROOT, "fixtures", "models")
OUT = os.path.join(ROOT, "fixtures", "generation")
EOS = 511


def write_eos_checkpoint():
    path = os.path.join(MODELS, "tiny-eos")
    shutil.rmtree(path, ignore_errors=True)
    config = GPT2Config(
        vocab_size=512, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=EOS, eos_token_id=EOS
    )
    model = GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
            elif "ln_" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
        # A final-norm bias along one direction and an EOS embedding along it: EOS is likely,
        # but not certain, at every step.
        direction = torch.randn(config.n_embd, generator=gen)
        direction /= direction.norm()
        model.transformer.ln_f.bias.copy_(model.transformer.ln_f.bias + 0.8 * direction)
        model.transformer.wte.weight[EOS] = 1.6 * direction + 0.05 * torch.randn(config.n_embd, generator=gen)
    model.save_pretrained(path, safe_serialization=True)
    gc = os.path.join(path, "generation_config.json")
    if os.path.exists(gc):
        os.remove(gc)
    return path


def search_cases():
    """(checkpoint, prompt length, mode, num_beams, no_repeat_ngram_size, num_return_sequences, new tokens)."""
    cases = []
    shapes = [
        ("greedy", 1, 0, 1),
        ("greedy", 1, 0, 1),  # greedy ignores no_repeat_ngram_size (the contract)
        ("beam", 1, 0, 1),
        ("beam", 2, 0, 2),
        ("beam", 3, 2, 1),
        ("beam", 4, 3, 4),
        ("beam", 5, 2, 3),
        ("beam", 6, 0, 6),
        ("beam", 6, 3, 2),
        ("beam", 5, 0, 5),
        ("beam", 3, 3, 3),
        ("beam", 2, 2, 1),
    ]
    lengths = [1, 4, 9, 17, 2, 12]
    for checkpoint in ("tiny-eos", "tiny-safetensors"):
        for i, (mode, beams, ngram, nret) in enumerate(shapes):
            for j in range(2):
                prompt_len = lengths[(i + 3 * j) % len(lengths)]
                new_tokens = [6, 12, 20, 30, 40][(i + j) % 5]
                cases.append((checkpoint, prompt_len, mode, beams, ngram, nret, new_tokens))
    return cases


def run_search_goldens():
    gen = torch.Generator().manual_seed(7)
    models = {}
    out = []
    for checkpoint, prompt_len, mode, beams, ngram, nret, new_tokens in search_cases():
        if checkpoint not in models:
            models[checkpoint] = GPT2LMHeadModel.from_pretrained(os.path.join(MODELS, checkpoint)).eval()
        model = models[checkpoint]
        prompt = torch.randint(0, EOS, (1, prompt_len), generator=gen)
        max_length = prompt_len + new_tokens
        config = GenerationConfig(
            max_length=max_length,
            do_sample=False,
            num_beams=beams,
            num_return_sequences=nret,
            no_repeat_ngram_size=ngram if ngram else None,
            early_stopping=True,
            length_penalty=1.0,
            eos_token_id=EOS,
            pad_token_id=EOS,
            bos_token_id=EOS,
        )
        with torch.no_grad():
            sequences = model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config
            )
        outputs = []
        for row in sequences.tolist():
            generated = row[prompt_len:]
            # Everything from the first EOS on is EOS or padding (also EOS): drop it.
            if EOS in generated:
                generated = generated[: generated.index(EOS)]
                ended_by_eos = True
            else:
                ended_by_eos = False
            outputs.append({"generated": generated, "ended_by_eos": ended_by_eos})
        out.append(
            {
                "checkpoint": checkpoint,
                "mode": mode,
                "prompt": prompt[0].tolist(),
                "max_length": max_length,
                "num_beams": beams,
                "no_repeat_ngram_size": ngram,
                "num_return_sequences": nret,
                "outputs": outputs,
            }
        )
    eos_endings = sum(o["ended_by_eos"] for case in out for o in case["outputs"])
    print(f"{len(out)} search cases, {eos_endings} outputs ended by EOS")
    with open(os.path.join(OUT, "search_goldens.json"), "w") as f:
        f.write('{"transformers": "%s", "cases": [\n' % transformers.__version__)
        f.write(",\n".join(json.dumps(case) for case in out))
        f.write("\n]}\n")


WARPER_PARAMS = [
    (1.0, 50, 0.92),
    (1.0, 50, 1.0),
    (0.7, 50, 0.92),
    (1.0, 0, 0.92),
    (0.5, 0, 0.5),
    (1.3, 10, 0.8),
    (1.0, 1, 1.0),
    (2.0, 0, 0.99),
    (0.7, 2000, 0.3),
    (1.0, 5, 1.0),
]


def run_warper_goldens():
    gen = torch.Generator().manual_seed(5)
    vocab = 2000
    rows = [
        3.0 * torch.randn(vocab, generator=gen),
        0.5 * torch.randn(vocab, generator=gen),
        torch.cat([torch.tensor([12.0]), torch.randn(vocab - 1, generator=gen)]),
        torch.round(2.0 * torch.randn(vocab, generator=gen)) / 2.0,  # many ties
    ]
    logits = torch.stack(rows).float()
    expected = []
    for temperature, top_k, top_p in WARPER_PARAMS:
        warpers = LogitsProcessorList()
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k != 0:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
        scores = warpers(torch.zeros((logits.shape[0], 1), dtype=torch.long), logits.clone())
        expected.append(torch.softmax(scores, dim=-1))
    save_file(
        {"logits": logits.contiguous(), "probs": torch.stack(expected).contiguous()},
        os.path.join(OUT, "warper_goldens.safetensors"),
        metadata={"transformers": transformers.__version__},
    )
    with open(os.path.join(OUT, "warper_goldens.json"), "w") as f:
        json.dump(
            {
                "transformers": transformers.__version__,
                "params": [{"temperature": t, "top_k": k, "top_p": p} for t, k, p in WARPER_PARAMS],
            },
            f,
            indent=1,
        )


REPETITION_PENALTIES = [1.2, 1.5, 0.8, 3.0, 1.05]


def repetition_cases():
    """(checkpoint, prompt length, small alphabet, mode, num_beams, no_repeat_ngram_size,
    num_return_sequences, min_new_tokens, new tokens, repetition_penalty)."""
    shapes = [
        # mode, beams, ngram, nret, min_new_tokens
        ("greedy", 1, 0, 1, 0),
        ("greedy", 1, 0, 1, 0),
        ("greedy", 1, 0, 1, 5),
        ("beam", 2, 0, 2, 0),
        ("beam", 3, 0, 1, 0),
        ("beam", 4, 0, 4, 0),
        ("beam", 5, 0, 3, 0),
        ("beam", 3, 2, 2, 0),
        ("beam", 4, 3, 1, 0),
        ("beam", 5, 0, 5, 4),
        ("beam", 1, 2, 1, 0),
    ]
    lengths = [1, 5, 9, 16, 3, 12]
    cases = []
    for checkpoint in ("tiny-eos", "tiny-safetensors"):
        for i, (mode, beams, ngram, nret, min_new) in enumerate(shapes):
            for j, penalty in enumerate(REPETITION_PENALTIES):
                if (i + j) % 5 == 4 and penalty != 1.05:
                    continue  # keep the set small: skip one (shape, penalty) in five
                prompt_len = lengths[(i + 2 * j) % len(lengths)]
                # Prompts drawn from a 12-token alphabet repeat tokens, so the penalty bites on
                # the prompt as well as on the generated tokens.
                small_alphabet = (i + j) % 3 == 0
                new_tokens = [8, 15, 25, 40][(i + j) % 4]
                cases.append(
                    (checkpoint, prompt_len, small_alphabet, mode, beams, ngram, nret, min_new, new_tokens, penalty)
                )
    return cases


def _generate(model, prompt, max_length, beams, ngram, nret, min_new, penalty):
    config = GenerationConfig(
        max_length=max_length,
        do_sample=False,
        num_beams=beams,
        num_return_sequences=nret,
        no_repeat_ngram_size=ngram if ngram else None,
        repetition_penalty=penalty,
        min_new_tokens=min_new if min_new else None,
        early_stopping=True,
        length_penalty=1.0,
        eos_token_id=EOS,
        pad_token_id=EOS,
        bos_token_id=EOS,
    )
    with torch.no_grad():
        sequences = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
    outputs = []
    for row in sequences.tolist():
        generated = row[prompt.shape[1] :]
        # Everything from the first EOS on is EOS or padding (also EOS): drop it.
        if EOS in generated:
            generated = generated[: generated.index(EOS)]
            ended_by_eos = True
        else:
            ended_by_eos = False
        outputs.append({"generated": generated, "ended_by_eos": ended_by_eos})
    return outputs


def run_repetition_goldens():
    gen = torch.Generator().manual_seed(23)
    models = {}
    out = []
    for checkpoint, prompt_len, small, mode, beams, ngram, nret, min_new, new_tokens, penalty in repetition_cases():
        if checkpoint not in models:
            models[checkpoint] = GPT2LMHeadModel.from_pretrained(os.path.join(MODELS, checkpoint)).eval()
        model = models[checkpoint]
        prompt = torch.randint(0, 12 if small else EOS, (1, prompt_len), generator=gen)
        max_length = prompt_len + new_tokens
        outputs = _generate(model, prompt, max_length, beams, ngram, nret, min_new, penalty)
        # The same request without the penalty: whether the penalty changed HF's answer.
        plain = _generate(model, prompt, max_length, beams, ngram, nret, min_new, 1.0)
        out.append(
            {
                "checkpoint": checkpoint,
                "mode": mode,
                "prompt": prompt[0].tolist(),
                "max_length": max_length,
                "num_beams": beams,
                "no_repeat_ngram_size": ngram,
                "num_return_sequences": nret,
                "min_new_tokens": min_new,
                "repetition_penalty": penalty,
                "changed_by_penalty": outputs != plain,
                "outputs": outputs,
            }
        )
    eos_endings = sum(o["ended_by_eos"] for case in out for o in case["outputs"])
    changed = sum(case["changed_by_penalty"] for case in out)
    print(
        f"{len(out)} repetition cases, {changed} changed by the penalty, {eos_endings} outputs ended by EOS"
    )
    with open(os.path.join(OUT, "repetition_goldens.json"), "w") as f:
        f.write('{"transformers": "%s", "torch": "%s", "cases": [\n' % (transformers.__version__, torch.__version__))
        f.write(",\n".join(json.dumps(case) for case in out))
        f.write("\n]}\n")


STEPS = {
    "eos-checkpoint": write_eos_checkpoint,
    "search": run_search_goldens,
    "warper": run_warper_goldens,
    "repetition": run_repetition_goldens,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only",
        action="append",
        choices=list(STEPS),
        help="write only this (repeatable); default: everything, in order",
    )
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    for name, step in STEPS.items():
        if args.only is None or name in args.only:
            step()


if __name__ == "__main__":
    main()
