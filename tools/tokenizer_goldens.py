"""Generate GPT-2 tokenizer parity goldens with Hugging Face transformers.

How to run (from the repository root):

    python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch transformers safetensors
    /tmp/hfvenv/bin/python tools/tokenizer_goldens.py

(torch is not actually needed here; `pip install transformers tokenizers` is enough.)

Inputs (paths are resolved relative to the repository root, found from this
script's own location, so the current directory does not matter):
    fixtures/tokenizer/corpus.json              JSON array of strings
    crates/gpt2-tokenizer/data/tokenizer.json   fast tokenizer (the one the crate embeds)
    fixtures/gpt2-tokenizer/vocab.json          slow tokenizer vocab
    fixtures/gpt2-tokenizer/merges.txt          slow tokenizer merges

Output:
    fixtures/tokenizer/goldens.json
        {"generator": "transformers X, tokenizers Y",
         "cases": [{"text": ..., "ids": [...], "decoded_skip_special": ...}, ...]}
    One case per line. If the slow tokenizer ever disagrees with the fast one,
    the case also gets "slow_ids" and a warning is printed.

ids are `tok(text, add_special_tokens=False)["input_ids"]` from the fast
tokenizer; decoded_skip_special is
`tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)`.

About the "slow" tokenizer: in transformers 4.x `GPT2Tokenizer` is the
pure-Python BPE, so it is an independent check on the Rust one. In
transformers >= 5 `GPT2Tokenizer` is the same Rust-backed class as
`GPT2TokenizerFast`, and it ignores `vocab_file=`/`merges_file=` (you get an
empty vocab and every text encodes to []). On 5.x this script therefore
builds it with `vocab=`/`merges=` from vocab.json + merges.txt. That still
checks that tokenizer.json agrees with vocab.json/merges.txt, but it runs the
same engine, so a warning is printed. For a true pure-Python cross-check, run
it under transformers 4.x as well, e.g. `pip install "transformers<5" tokenizers`.
"""

import json
import sys
import unicodedata
from pathlib import Path

import tokenizers
import transformers
from transformers import GPT2Tokenizer, GPT2TokenizerFast

ROOT = Path(__file__).resolve().parent.parent
TOK_DIR = ROOT / "fixtures" / "gpt2-tokenizer"
TOKENIZER_JSON = ROOT / "crates" / "gpt2-tokenizer" / "data" / "tokenizer.json"
CORPUS = ROOT / "fixtures" / "tokenizer" / "corpus.json"
OUT = ROOT / "fixtures" / "tokenizer" / "goldens.json"

# Characters that are invisible or disruptive in a diff/terminal are written as
# \uXXXX escapes (still standard JSON; any JSON parser reads them back the same).
_ESCAPE_CATEGORIES = {"Cc", "Cf", "Co", "Cn", "Zl", "Zp", "Zs"}


def _escape_char(ch: str) -> str:
    cp = ord(ch)
    if cp <= 0xFFFF:
        return "\\u%04x" % cp
    cp -= 0x10000
    return "\\u%04x\\u%04x" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF))


def dumps(value) -> str:
    s = json.dumps(value, ensure_ascii=False)
    return "".join(
        _escape_char(ch)
        if ch != " " and unicodedata.category(ch) in _ESCAPE_CATEGORIES
        else ch
        for ch in s
    )


def load_slow():
    vocab_file = TOK_DIR / "vocab.json"
    merges_file = TOK_DIR / "merges.txt"
    if callable(getattr(GPT2Tokenizer, "bpe", None)):
        # transformers 4.x: genuine pure-Python slow tokenizer.
        return GPT2Tokenizer(vocab_file=str(vocab_file), merges_file=str(merges_file))
    # transformers >= 5: GPT2Tokenizer is Rust-backed and ignores vocab_file/merges_file.
    print(
        f"WARNING: transformers {transformers.__version__} has no pure-Python GPT2Tokenizer; "
        "the slow check builds the same Rust BPE from vocab.json + merges.txt "
        "(not an independent implementation)",
        file=sys.stderr,
    )
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    merges = []
    for line in merges_file.read_text(encoding="utf-8").split("\n"):
        if not line or line.startswith("#version"):
            continue
        a, b = line.split(" ")
        merges.append((a, b))
    return GPT2Tokenizer(vocab=vocab, merges=merges)


def main() -> int:
    corpus = json.loads(CORPUS.read_text(encoding="utf-8"))
    assert isinstance(corpus, list) and all(isinstance(s, str) for s in corpus)

    fast = GPT2TokenizerFast(tokenizer_file=str(TOKENIZER_JSON))
    slow = load_slow()

    cases = []
    disagreements = 0
    for text in corpus:
        ids = fast(text, add_special_tokens=False)["input_ids"]
        slow_ids = slow(text, add_special_tokens=False)["input_ids"]
        decoded = fast.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        case = {"text": text, "ids": ids, "decoded_skip_special": decoded}
        if slow_ids != ids:
            disagreements += 1
            case["slow_ids"] = slow_ids
            print(
                f"WARNING: fast/slow disagree on {text!r}: fast={ids} slow={slow_ids}",
                file=sys.stderr,
            )
        cases.append(case)

    generator = (
        f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}"
    )
    lines = ",\n".join(dumps(c) for c in cases)
    OUT.write_text(
        '{"generator": ' + dumps(generator) + ',\n"cases": [\n' + lines + "\n]}\n",
        encoding="utf-8",
    )

    # Round-trip sanity check: the file must parse back to exactly what we built.
    back = json.loads(OUT.read_text(encoding="utf-8"))
    assert back["cases"] == cases and back["generator"] == generator

    print(
        f"wrote {OUT.relative_to(ROOT)}: {len(cases)} cases, "
        f"{disagreements} fast/slow disagreements ({generator})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
