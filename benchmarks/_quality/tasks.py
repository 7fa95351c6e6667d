"""The benchmark's tasks: reading ``shared/data``, carving a validation split out of train,
tokenising, and a trainer whose batches hold examples of similar length.

Every task is read with the library's own readers (``deltatune.train.data``), except two
places where the benchmark needs something the generic reader does not do:

* RTE's sentence pairs are joined with the end-of-text token between them, and the *premise* is
  truncated when the pair is too long (the tokenizer has no pair template: its own pair
  encoding would glue the two sentences together, and truncating the joined text would cut the
  hypothesis off);
* Tiny Shakespeare is split by characters, first 90% train / last 10% test; each part is then
  read as the library reads a ``.txt`` file (non-empty lines, each followed by the end-of-text
  token, one stream cut into blocks of ``max_length`` tokens).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltatune.train import data as data_mod
from deltatune.train.loop import Trainer

#: the split that carves validation examples out of train (fixed: the same for every run)
VAL_SEED = 1234


@dataclass(frozen=True)
class TaskSpec:
    """One task of the benchmark.

    Args:
        name: short name (``sst2`` …).
        kind: ``classification`` or ``causal-lm``.
        train / test: files under the data directory.
        metric: the reported metric (``accuracy``, ``mcc``, ``perplexity``).
        max_length: tokens per example (classification) or per block (causal LM).
        steps: optimizer steps of a final run.
        batch_size: examples per step.
        val_size: examples (blocks) carved out of train for choosing the learning rate.
        pair: two text columns, joined as ``first <eos> second`` (premise truncated first).
        rows: ``all`` (every row of the benchmark) or ``screen`` (the baselines and one
            representative delta, ``SCREEN_ROWS``: for tasks where full fine-tuning barely
            leaves chance at the budget the benchmark can afford).
        lr_from: the task whose validation sweep chooses each row's learning rate (``None``:
            this task's own).
        lr_scale: multiplies every row's learning-rate grid on this task (short runs of a
            language model favour higher rates: the grid is centred where earlier sweeps won).
        eval_batch_size: examples per evaluation batch (the fastest on one CPU thread:
            smaller for the language model, whose 8,192-way logits dominate).
    """

    name: str
    kind: str
    train: str
    test: str
    metric: str
    max_length: int
    steps: int
    batch_size: int = 16
    val_size: int = 400
    pair: bool = False
    rows: str = "all"
    lr_from: str | None = None
    lr_scale: float = 1.0
    eval_batch_size: int = 32
    description: str = ""

    def __post_init__(self) -> None:
        if self.rows not in ("all", "screen"):
            raise ValueError(f"rows must be 'all' or 'screen', not {self.rows!r}")
        if self.lr_from == self.name:
            raise ValueError(f"{self.name}: lr_from names the task itself")


@dataclass
class TaskData:
    """Encoded splits of one task."""

    spec: TaskSpec
    train: data_mod.Dataset
    val: data_mod.Dataset
    test: data_mod.Dataset
    label_names: list[str] = field(default_factory=list)
    pad_id: int = 0

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def _table(path: Path) -> data_mod.Table:
    return data_mod.read_table(path, quoting=True)  # rte and agnews are CSV-quoted


def _cap(table: data_mod.Table, n: int | None) -> data_mod.Table:
    if n is not None and len(table.rows) > n:
        table.rows = table.rows[:n]
    return table


def _encode_pairs(table: data_mod.Table, columns: data_mod.Columns, tokenizer: Any,
                  max_length: int, names: list[str]) -> data_mod.Dataset:
    first, second = columns.text
    eos = tokenizer.eos_token_id
    a = tokenizer([str(r[first]) for r in table.rows], add_special_tokens=False)["input_ids"]
    b = tokenizer([" " + str(r[second]) for r in table.rows],
                  add_special_tokens=False)["input_ids"]
    index = {n: i for i, n in enumerate(names)}
    examples = []
    for x, y, row in zip(a, b, table.rows, strict=True):
        y = y[:max_length // 2]
        x = x[:max(1, max_length - len(y) - 1)]
        examples.append({"input_ids": [*x, eos, *y],
                         "labels": index[str(row[columns.label]).strip()]})
    return data_mod.Dataset(examples, "classification", names)


def _encode(table: data_mod.Table, columns: data_mod.Columns, tokenizer: Any, spec: TaskSpec,
            names: list[str]) -> data_mod.Dataset:
    if spec.pair:
        out = _encode_pairs(table, columns, tokenizer, spec.max_length, names)
    else:
        out = data_mod.encode(table, columns, tokenizer, max_length=spec.max_length,
                              label_names=names)
    out.left_pad = True  # the Llama classifier reads the last token
    return out


def _by_length(dataset: data_mod.Dataset) -> data_mod.Dataset:
    """The same examples sorted by length: evaluation pads each batch to its longest example,
    and metrics do not depend on the order."""
    dataset.examples = sorted(dataset.examples, key=lambda e: len(e["input_ids"]))
    return dataset


def load_classification(spec: TaskSpec, data_dir: Path, tokenizer: Any, *,
                        max_train: int | None = None,
                        max_test: int | None = None) -> TaskData:
    """Train / validation (carved out of train) / test datasets of a classification task."""
    train_t = _table(data_dir / spec.train)
    test_t = _cap(_table(data_dir / spec.test), max_test)
    columns = data_mod.resolve_columns(train_t, "classification")
    names = data_mod.label_names_of(train_t, columns.label)
    fraction = min(0.5, spec.val_size / len(train_t))
    train_t, val_t = data_mod.split_off(train_t, fraction, VAL_SEED)
    train_t = _cap(train_t, max_train)
    return TaskData(spec, _encode(train_t, columns, tokenizer, spec, names),
                    _by_length(_encode(val_t, columns, tokenizer, spec, names)),
                    _by_length(_encode(test_t, columns, tokenizer, spec, names)),
                    names, tokenizer.pad_token_id)


def _stream_blocks(text: str, tokenizer: Any, block: int) -> list[dict[str, Any]]:
    """The library's plain-text format: every non-empty line, then the end-of-text token, as
    one stream cut into blocks (what ``deltatune train`` does with a ``.txt`` file)."""
    rows = [{"text": line} for line in text.splitlines() if line.strip()]
    table = data_mod.Table(["text"], rows, "text", stream=True)
    columns = data_mod.Columns("causal-lm", text=("text",))
    return data_mod.encode(table, columns, tokenizer, max_length=block).examples


def load_language_model(spec: TaskSpec, data_dir: Path, tokenizer: Any, *,
                        max_train: int | None = None,
                        max_test: int | None = None) -> TaskData:
    """Blocks of the first 90% (train, minus ``val_size`` random blocks held out) and the last
    10% (test) of a text file."""
    text = (data_dir / spec.train).read_text(encoding="utf-8")
    cut = int(0.9 * len(text))
    train = _stream_blocks(text[:cut], tokenizer, spec.max_length)
    test = _stream_blocks(text[cut:], tokenizer, spec.max_length)
    order = list(range(len(train)))
    random.Random(VAL_SEED).shuffle(order)
    n_val = min(spec.val_size, len(train) // 2)
    held = set(order[:n_val])
    val = [b for i, b in enumerate(train) if i in held]
    train = [b for i, b in enumerate(train) if i not in held]
    if max_train is not None:
        train = train[:max_train]
    if max_test is not None:
        test = test[:max_test]
    return TaskData(spec, data_mod.Dataset(train, "causal-lm"), data_mod.Dataset(val, "causal-lm"),
                    data_mod.Dataset(test, "causal-lm"), [], tokenizer.pad_token_id)


def load_task(spec: TaskSpec, data_dir: str | Path, tokenizer: Any, **caps: Any) -> TaskData:
    """The encoded splits of ``spec`` (``caps``: ``max_train`` / ``max_test`` rows, for smoke
    runs only)."""
    loader = load_classification if spec.kind == "classification" else load_language_model
    return loader(spec, Path(data_dir), tokenizer, **caps)


def tokens_per_step(data: TaskData, batch_size: int, *, pool: int = 16) -> float:
    """Mean padded tokens of one training batch under ``LengthTrainer``'s batching."""
    lengths = sorted(len(e["input_ids"]) for e in data.train.examples)
    if not lengths:
        return 0.0
    rng = random.Random(0)
    sample = rng.sample(lengths, min(len(lengths), batch_size * pool * 8))
    total, count = 0.0, 0
    for start in range(0, len(sample), batch_size * pool):
        chunk = sorted(sample[start:start + batch_size * pool])
        for b in range(0, len(chunk), batch_size):
            part = chunk[b:b + batch_size]
            total += max(part) * batch_size
            count += 1
    return total / max(count, 1)


def eval_tokens(dataset: data_mod.Dataset, batch_size: int) -> int:
    """Padded tokens of one evaluation pass (the dataset sorted by length)."""
    ex = dataset.examples
    return sum(max(len(e["input_ids"]) for e in ex[i:i + batch_size]) * len(ex[i:i + batch_size])
               for i in range(0, len(ex), batch_size))


class LengthTrainer(Trainer):
    """The library's trainer, with batches of similar length (less padding, same examples).

    Each epoch's permutation (drawn as the library draws it, from the seed and the epoch) is
    cut into pools of ``pool`` batches; each pool is sorted by length and cut into batches, and
    the full batches are shuffled. The order stays a function of the seed and the step.
    """

    pool = 16

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch: int | None = None
        self._order: list[int] = []

    def batch_indices(self, step: int) -> list[int]:
        epoch, position = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._order, self._epoch = self._epoch_order(epoch), epoch
        bs = self.settings.batch_size
        return self._order[position * bs:(position + 1) * bs]

    def _epoch_order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.settings.seed * 100_003 + epoch)
        order = torch.randperm(len(self.train_set), generator=gen).tolist()
        lengths = [len(e["input_ids"]) for e in self.train_set.examples]
        bs = self.settings.batch_size
        full, tail = [], []
        for start in range(0, len(order), bs * self.pool):
            pool = sorted(order[start:start + bs * self.pool], key=lambda i: lengths[i])
            for b in range(0, len(pool), bs):
                (full if len(pool[b:b + bs]) == bs else tail).append(pool[b:b + bs])
        shuffled = torch.randperm(len(full), generator=gen).tolist()
        return [i for k in shuffled for i in full[k]] + [i for t in tail for i in t]


__all__ = ["VAL_SEED", "LengthTrainer", "TaskData", "TaskSpec", "eval_tokens", "load_task",
           "tokens_per_step"]
