"""The tokenized samples of a recipe's sources, and the micro-batches the plan asks for."""

import hashlib

import torch

from torch.utils.data import Dataset

from lt_posttrain.data.collate import collate_packed, collate_padded
from lt_posttrain.data.messages import messages_from_row
from lt_posttrain.data.plan import MicroBatch
from lt_posttrain.data.sources import Source, load_rows
from lt_posttrain.data.tokenize import count_loss_tokens, tokenize_conversation

FORMAT_VERSION = "2"  # bump when tokenization changes, so cached results are not reused


def tokenize_rows(rows, source: Source, tokenizer, max_length: int, chat_template: str | None):
    """Stages 2 and 3 over a table of rows: a ``datasets.Dataset`` of ``input_ids``, ``labels``, ``truncated``,
    ``length``, ``loss_count`` (and ``weight`` when the rows have a ``weight`` column: it scales the sample's token
    losses, never the normaliser); conversations without any assistant turn are left out. Cached with the rows'."""
    weighted = "weight" in rows.column_names

    def convert(batch, indices):
        out = {"input_ids": [], "labels": [], "truncated": [], "length": [], "loss_count": []}
        if weighted:
            out["weight"] = []
        for offset, index in enumerate(indices):
            row = {column: values[offset] for column, values in batch.items()}
            messages = messages_from_row(row, source.name_or_path, index)
            for sample in tokenize_conversation(messages, tokenizer, max_length, chat_template):
                count = count_loss_tokens(sample["labels"])
                if count:
                    for key in ("input_ids", "labels", "truncated"):
                        out[key].append(sample[key])
                    out["length"].append(len(sample["input_ids"]))
                    out["loss_count"].append(count)
                    if weighted:
                        out["weight"].append(float(row["weight"]))
        return out

    template = chat_template or tokenizer.chat_template or ""
    identity = f"{FORMAT_VERSION}|{rows._fingerprint}|{tokenizer.name_or_path}|{len(tokenizer)}|{template}|{max_length}"
    return rows.map(
        convert,
        batched=True,
        with_indices=True,
        remove_columns=rows.column_names,
        new_fingerprint=hashlib.sha256(identity.encode()).hexdigest()[:32],
        desc=f"Tokenizing {source.name_or_path}",
    )


def load_samples(sources: list[Source], tokenizer, max_length: int, chat_template: str | None, rows_of=load_rows):
    """All sources tokenized and concatenated (a ``datasets.Dataset``)."""
    import datasets

    parts = [tokenize_rows(rows_of(source), source, tokenizer, max_length, chat_template) for source in sources]
    if any("weight" in part.column_names for part in parts):  # unweighted sources weigh 1
        parts = [part if "weight" in part.column_names else part.add_column("weight", [1.0] * len(part)) for part in parts]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


class MicroBatchDataset(Dataset):
    """Indexed by a :class:`MicroBatch` (from ``PlanSampler``): returns its collated tensors plus its loss counts."""

    def __init__(self, samples, packing: bool, pad_id: int):
        self.samples, self.packing, self.pad_id = samples, packing, pad_id

    def __getitem__(self, micro_batch: MicroBatch) -> dict:
        indices = [index for row in micro_batch.rows for index in row]
        samples = self.samples[indices] if indices else {"input_ids": [], "labels": []}
        columns = [column for column in ("input_ids", "labels", "weight") if column in samples]
        rows = [dict(zip(columns, values)) for values in zip(*(samples[column] for column in columns))]
        batch = collate_packed(rows) if self.packing else collate_padded(rows, self.pad_id)
        batch["loss_count"] = torch.tensor(micro_batch.loss_count)
        batch["step_loss_count"] = torch.tensor(micro_batch.step_loss_count)
        return batch

    def __len__(self) -> int:
        return len(self.samples)
