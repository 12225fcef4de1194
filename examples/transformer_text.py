"""Wrapping a transformer text classifier that takes a dict of inputs and returns an output object.

The model has the interface of a Hugging Face sequence classifier — ``model(input_ids=...,
attention_mask=...)`` returning an object with ``.logits`` — built from ``nn.TransformerEncoder``,
whose eval fast path would silently skip dropout in a naive MC dropout loop. It learns a toy
sentiment task (more "positive" than "negative" tokens), then MC dropout scores held-out sentences
and sentences of words it never saw.

Run: ``python examples/transformer_text.py`` (about 30 s on 2 CPU cores).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

import mcdrop
from mcdrop import metrics

VOCAB, SEQ, PAD = 64, 12, 0
POSITIVE, NEGATIVE, NEUTRAL, UNSEEN = range(1, 9), range(9, 17), range(17, 48), range(48, 64)


@dataclass
class ClassifierOutput:
    logits: torch.Tensor


class TinyTextClassifier(nn.Module):
    def __init__(self, dim: int = 32, p: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim, padding_idx=PAD)
        self.pos = nn.Parameter(torch.randn(SEQ, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, dim_feedforward=64, dropout=p, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(dim, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ClassifierOutput:
        h = self.embed(input_ids) + self.pos
        h = self.encoder(h, src_key_padding_mask=attention_mask == 0)
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1)
        return ClassifierOutput(logits=self.classifier(self.dropout(pooled)))


def make_batch(n: int, gen: torch.Generator, words: range | None = None) -> dict[str, torch.Tensor]:
    lengths = torch.randint(6, SEQ + 1, (n,), generator=gen)
    if words is None:
        pool = torch.tensor(list(POSITIVE) + list(NEGATIVE) + list(NEUTRAL) * 2)
    else:
        pool = torch.tensor(list(words))
    ids = pool[torch.randint(0, len(pool), (n, SEQ), generator=gen)]
    mask = (torch.arange(SEQ) < lengths[:, None]).long()
    ids = ids * mask
    pos = ((ids >= POSITIVE.start) & (ids < POSITIVE.stop)).sum(1)
    neg = ((ids >= NEGATIVE.start) & (ids < NEGATIVE.stop)).sum(1)
    return {"input_ids": ids, "attention_mask": mask, "labels": (pos > neg).long()}


def main() -> None:
    torch.set_num_threads(1)  # a model this small runs fastest on one thread (no intra-op sync)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = TinyTextClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(400):
        batch = make_batch(64, gen)
        labels = batch.pop("labels")
        loss = nn.functional.cross_entropy(model(**batch).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    mc = mcdrop.MCDropout(model, n_samples=50, seed=0)
    print(mc.describe()[["path", "kind", "rate", "sampled"]].to_string(index=False))

    # A loader of dict batches: "labels" is taken out as the target, the rest are keyword inputs.
    test = [make_batch(128, gen) for _ in range(4)]
    pred = mc.predict_loader(DataLoader(test, batch_size=None), progress=False)
    print(
        f"accuracy {metrics.accuracy(pred.probs, pred.targets):.3f}, "
        f"ECE {metrics.expected_calibration_error(pred.probs, pred.targets):.3f}"
    )

    unseen = make_batch(512, gen, words=UNSEEN)
    unseen.pop("labels")
    ood = mc.predict(**unseen)
    auroc = metrics.ood_auroc(pred.mutual_information, ood.mutual_information)
    print(
        f"mean MI: in-distribution {pred.mutual_information.mean():.4f}, "
        f"unseen words {ood.mutual_information.mean():.4f}; OOD AUROC by MI {auroc:.3f}"
    )


if __name__ == "__main__":
    main()
