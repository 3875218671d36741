"""Personalise a real pretrained model on one user's small slice of data, on the device, then compare.

A reader tags a few dozen BBC News articles with their own topics. We export all-MiniLM-L6-v2 once
(on the "workstation": torch), fine-tune only LoRA-FA adapters and the new topic head with the
torch-free device loop, and compare predictions on headlines the model never saw.

Run: .venv/bin/python examples/personalise_news_topics.py   (about a minute on 2 cores)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import edge_peft
from edge_peft.bundled import BBC_LABELS, bbc_news_split, minilm_dir, write_jsonl
from edge_peft.device.inference import accuracy

work = Path(tempfile.mkdtemp(prefix="edge-peft-example-"))

# 1. The user's data: 12 tagged articles per topic (60 in all), and unseen ones to check on.
user_articles, unseen = bbc_news_split(per_class_train=12, per_class_test=20, seed=7)
train_file = write_jsonl(work / "my-articles.jsonl", user_articles)

# 2. Workstation: export the base model with an int8 base, LoRA-FA adapters and a new topic head.
artifact = work / "artifact"
edge_peft.export(minilm_dir(), artifact, rank=8, alpha=16, quantize="int8", labels=BBC_LABELS, max_seq_len=128)

# 3. Device: before training, the head is untrained, so predictions are near chance.
before = edge_peft.Predictor(artifact)

# 4. Device: train only the adapters and the head on the user's 60 articles (no torch involved).
run = work / "run"
summary = edge_peft.train(artifact, train_file, run, steps=40, batch_size=8, lr=5e-3, eval_fraction=0.0, eval_every=0)
after = edge_peft.Predictor(run)

# 5. Compare on headlines (the first sentence of unseen articles).
headlines = [{"text": row["text"].split(".")[0], "label": row["label"]} for row in unseen]
print(f"\n{'headline':<60} {'true':<13} {'before':<13} after")
for row, (b, _), (a, _) in zip(headlines[:8], before.classify([r["text"] for r in headlines[:8]]),
                               after.classify([r["text"] for r in headlines[:8]])):
    print(f"{row['text'][:58]:<60} {row['label']:<13} {b:<13} {a}")
print(f"\nheadline accuracy on {len(headlines)} unseen articles: "
      f"{accuracy(before, headlines):.0%} before -> {accuracy(after, headlines):.0%} after "
      f"({summary['steps']} steps, {summary['tokens_per_s']:.0f} tokens/s, peak RSS {summary['peak_rss_mb']:.0f} MB)")

# 6. Hand the personal adapter out in the Hugging Face PEFT format (PeftModel.from_pretrained loads it).
print(f"PEFT adapter: {edge_peft.save_adapter(run, work / 'my-adapter')}")
