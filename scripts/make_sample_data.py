"""Generate the bundled demo dataset from the fact table of a fictional clinic.

    .venv/bin/python scripts/make_sample_data.py          # rewrite ollama_ft/data_files/clinic_sample.jsonl
    .venv/bin/python scripts/make_sample_data.py --check  # exit 1 if the committed file is out of date

Input: ollama_ft/data_files/clinic_facts.json (Larkspur Valley Clinic: hours, triage colours, rooms,
forms, made-up medication names, protocol codes, escalation rules; all invented, so the base model
cannot know them and nothing reads as medical advice). Each fact has one short answer and
hand-written questions: three for training, one paraphrase for validation, one for test.

Output: OpenAI-messages JSONL, one record per question, each with the clinic's system prompt, a
"split" field that the data stage honours, and the answer's key facts ("facts": what an answer
must state; the eval stage scores key-fact accuracy with them, eval/facts.py). Test questions are paraphrases never seen in training,
so a rising score on the test split means the facts were learned, not the strings. Deterministic:
the same fact table always gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FACTS = ROOT / "ollama_ft" / "data_files" / "clinic_facts.json"
OUT = ROOT / "ollama_ft" / "data_files" / "clinic_sample.jsonl"

# Extra training phrasings: the same question with the small talk real users add.
_WRAPPERS = [
    "Hi! {q}",
    "Quick question: {lq}",
    "{q} Thanks.",
    "Could you tell me this: {lq}",
    "Hello, {lq}",
    "{q} I could not find it anywhere.",
]


def _lower_first(q: str) -> str:
    # Keep proper nouns and codes ("Form LV-12", "Larkspur") capitalised.
    first = q.split(" ", 1)[0]
    return q if first[1:2].isupper() or first in ("I", "Larkspur", "Protocol", "Form", "Dr.") else q[0].lower() + q[1:]


def generate(facts_doc: dict, seed: int = 7) -> list[dict]:
    """The records for a fact table (pure and deterministic)."""
    rng = random.Random(seed)
    system = facts_doc["system_prompt"]
    records = []

    def rec(fid: str, tag: str, question: str, answer: str, split: str, key_facts: list[str]) -> dict:
        return {"id": f"{fid}-{tag}", "split": split, "facts": key_facts, "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer}]}

    for fact in facts_doc["facts"]:
        fid, answer, key_facts = fact["id"], fact["answer"], fact["key_facts"]
        for k, q in enumerate(fact["train"]):
            records.append(rec(fid, f"t{k}", q, answer, "train", key_facts))
        for k, w in enumerate(rng.sample(_WRAPPERS, 2)):
            q = rng.choice(fact["train"])
            records.append(rec(fid, f"w{k}", w.format(q=q, lq=_lower_first(q)), answer, "train", key_facts))
        records.append(rec(fid, "v", fact["validation"], answer, "validation", key_facts))
        records.append(rec(fid, "p", fact["test"], answer, "test", key_facts))
    return records


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Generate ollama_ft/data_files/clinic_sample.jsonl")
    ap.add_argument("--check", action="store_true", help="only check that the committed file is up to date")
    ap.add_argument("--facts", type=Path, default=FACTS)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    text = render(generate(json.loads(args.facts.read_text(encoding="utf-8"))))
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is out of date; run scripts/make_sample_data.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(args.out)
    n = text.count("\n")
    print(f"wrote {n} records ({len(text.encode()) // 1024} KiB) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
