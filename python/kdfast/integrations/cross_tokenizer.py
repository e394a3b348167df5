"""Cross-tokenizer distillation in any training loop: two tokenizations, span pairs, the loss.

A teacher and a student with different tokenizers read the same texts. `encode_cross`
tokenizes a batch of texts with both tokenizers (fast tokenizers: a Hugging Face
`PreTrainedTokenizerFast` or a `tokenizers.Tokenizer`), keeps byte offsets, and pairs the rows
of the two models that predict the same bytes: `align_byte_offsets` groups both tokenizations
into spans covering the same bytes, and each closed span whose first token is not a text's
first token on either side gives one (student position, teacher position) pair, the logits
rows that predict that first token (`span_pairs`). `cross_tokenizer_kd_loss` gathers those rows
and applies `kdfast.uld_loss` (sorted-probability L1 distance, vocabularies of any sizes).
Everything is vectorised over the batch; the only per-text work is the tokenizers' own.

Contract: offsets are byte offsets (character offsets of fast tokenizers are converted with
`char_to_byte_offsets`); padding is on the right; a text longer than `max_length` tokens on
either side is truncated, and its spans past the shorter side's end are not paired.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor

from kdfast.alignment import align_byte_offsets, char_to_byte_offsets, span_positions
from kdfast.functional import uld_loss
from kdfast.onpolicy import model_logits

__all__ = ["CrossTokenizerCollator", "cross_tokenizer_distillation_loss", "cross_tokenizer_kd_loss", "encode_cross",
           "encode_with_offsets", "paired_rows", "span_pairs"]


def encode_with_offsets(tokenizer, texts: Sequence[str], max_length: int) -> Dict[str, Tensor]:
    """One side of `encode_cross`: input_ids [B, L] int64 (0-padded on the right),
    attention_mask [B, L] int64 and byte offsets [B, L, 2] int64 of each text's first
    `max_length` tokens (L = the longest kept encoding, at least 1). No special tokens are added.

    `tokenizer` is a `tokenizers.Tokenizer` (has `encode_batch`) or a Hugging Face fast
    tokenizer (called with `return_offsets_mapping=True`).
    """
    if max_length < 1:
        raise ValueError(f"encode_with_offsets: max_length must be >= 1, got {max_length}")
    texts = list(texts)
    if hasattr(tokenizer, "encode_batch"):
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        ids_list = [encoding.ids for encoding in encodings]
        offsets_list = [encoding.offsets for encoding in encodings]
    elif callable(tokenizer):
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        ids_list, offsets_list = encoded["input_ids"], encoded["offset_mapping"]
    else:
        raise TypeError(f"encode_with_offsets: expected a fast tokenizer, got {type(tokenizer).__name__}")
    length = max(1, min(max_length, max((len(ids) for ids in ids_list), default=1)))
    ids = torch.zeros(len(texts), length, dtype=torch.int64)
    mask = torch.zeros(len(texts), length, dtype=torch.int64)
    offsets = torch.zeros(len(texts), length, 2, dtype=torch.int64)
    for row, (text, row_ids, row_offsets) in enumerate(zip(texts, ids_list, offsets_list)):
        count = min(length, len(row_ids))
        if count == 0:
            continue
        ids[row, :count] = torch.as_tensor(row_ids[:count], dtype=torch.int64)
        mask[row, :count] = 1
        offsets[row, :count] = torch.from_numpy(char_to_byte_offsets(text, list(row_offsets[:count])))
    return {"input_ids": ids, "attention_mask": mask, "offsets": offsets}


def span_pairs(student_offsets: Tensor, teacher_offsets: Tensor, student_mask: Tensor,
               teacher_mask: Tensor) -> Tensor:
    """[B, S, 2] int64: per text and closed span, the (student, teacher) logits rows that
    predict the span's first token (its first position − 1); (−1, −1) for unused slots (spans
    that are not closed, or that start at a text's first token on either side).

    Args:
        student_offsets, teacher_offsets: [B, L_s, 2] / [B, L_t, 2] byte offsets.
        student_mask, teacher_mask: [B, L_s] / [B, L_t] attention masks (bool or int).
    """
    alignment = align_byte_offsets(student_offsets, teacher_offsets, student_mask=student_mask.bool(),
                                   teacher_mask=teacher_mask.bool())
    spans = alignment.max_spans
    student_first = span_positions(alignment.student_spans, spans, "first")
    teacher_first = span_positions(alignment.teacher_spans, spans, "first")
    use = alignment.span_mask() & (student_first > 0) & (teacher_first > 0)
    pairs = torch.stack([student_first - 1, teacher_first - 1], dim=-1)
    return torch.where(use[..., None], pairs, torch.full_like(pairs, -1))


def encode_cross(texts: Sequence[str], student_tokenizer, teacher_tokenizer, max_length: int) -> Dict[str, Tensor]:
    """Both tokenizations of `texts` and their span pairs, as one batch dict:
    input_ids / attention_mask (student, [B, L_s] int64), teacher_input_ids /
    teacher_attention_mask ([B, L_t] int64) and span_pairs ([B, S, 2] int64, see `span_pairs`).
    """
    student = encode_with_offsets(student_tokenizer, texts, max_length)
    teacher = encode_with_offsets(teacher_tokenizer, texts, max_length)
    pairs = span_pairs(student["offsets"], teacher["offsets"], student["attention_mask"], teacher["attention_mask"])
    return {"input_ids": student["input_ids"], "attention_mask": student["attention_mask"],
            "teacher_input_ids": teacher["input_ids"], "teacher_attention_mask": teacher["attention_mask"],
            "span_pairs": pairs}


def paired_rows(student_logits: Tensor, teacher_logits: Tensor, pairs: Tensor) -> tuple:
    """([R, V_s], [R, V_t]): the logits rows of the used pairs of a batch, in text then span
    order, from student_logits [B, L_s, V_s], teacher_logits [B, L_t, V_t] and pairs [B, S, 2]."""
    if student_logits.shape[0] != pairs.shape[0] or teacher_logits.shape[0] != pairs.shape[0]:
        raise ValueError(f"paired_rows: batch sizes differ: student {student_logits.shape[0]}, teacher "
                         f"{teacher_logits.shape[0]}, pairs {pairs.shape[0]}")
    pairs = pairs.to(student_logits.device)
    used = pairs[..., 0] >= 0
    batch_index = torch.arange(pairs.shape[0], device=pairs.device)[:, None].expand_as(used)[used]
    return (student_logits[batch_index, pairs[..., 0][used]],
            teacher_logits[batch_index.to(teacher_logits.device), pairs[..., 1][used].to(teacher_logits.device)])


def cross_tokenizer_kd_loss(student_logits: Tensor, teacher_logits: Tensor, pairs: Tensor, *, k: Optional[int] = None,
                            student_temperature: float = 1.0, teacher_temperature: float = 1.0,
                            reduction: str = "mean") -> Tensor:
    """ULD between the student's and the teacher's predictions of the same byte spans.

    Args:
        student_logits: [B, L_s, V_s] (any float dtype; the gradient flows to it).
        teacher_logits: [B, L_t, V_t], a constant (V_t may differ from V_s).
        pairs: [B, S, 2] int64 from `span_pairs` / `encode_cross` (−1 marks unused slots).
        k, student_temperature, teacher_temperature, reduction: as `kdfast.uld_loss`
            (k = None: the exact loss; an int: its top-k form).

    Returns:
        The float32 loss over the R paired rows (reduction "none": [R]); 0 with a gradient
        path when the batch has no pair.
    """
    student_rows, teacher_rows = paired_rows(student_logits, teacher_logits, pairs)
    if student_rows.shape[0] == 0:
        zero = student_logits.float().sum() * 0.0
        return zero.expand(0) if reduction == "none" else zero
    return uld_loss(student_rows, teacher_rows.to(student_rows.device), k=k,
                    student_temperature=student_temperature, teacher_temperature=teacher_temperature,
                    reduction=reduction)


class CrossTokenizerCollator:
    """Data collator: examples with a text field -> an `encode_cross` batch plus `labels`.

    Args:
        student_tokenizer, teacher_tokenizer: fast tokenizers (see `encode_with_offsets`).
        max_length: tokens kept per text on each side (default 512).
        text_key: the examples' text field (default "text"); plain strings are accepted too.

    Returns (per call): input_ids, attention_mask, labels ([B, L_s]: input_ids with -100 at
    padding; the causal shift happens in the loss), teacher_input_ids, teacher_attention_mask
    and span_pairs. With `transformers.Trainer`, keep the text column in the examples:
    `TrainingArguments(remove_unused_columns=False)`.
    """

    def __init__(self, student_tokenizer, teacher_tokenizer, max_length: int = 512, text_key: str = "text") -> None:
        if max_length < 2:
            raise ValueError(f"CrossTokenizerCollator: max_length must be >= 2, got {max_length}")
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.max_length, self.text_key = int(max_length), text_key

    def __call__(self, examples: Sequence[Any]) -> Dict[str, Tensor]:
        texts = []
        for example in examples:
            if isinstance(example, str):
                texts.append(example)
            elif hasattr(example, "keys") and self.text_key in example:
                texts.append(example[self.text_key])
            else:
                raise ValueError(f"CrossTokenizerCollator: each example needs a {self.text_key!r} field (with "
                                 "transformers.Trainer keep it: TrainingArguments(remove_unused_columns=False)); "
                                 f"got {type(example).__name__}")
        batch = encode_cross(texts, self.student_tokenizer, self.teacher_tokenizer, self.max_length)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch


def cross_tokenizer_distillation_loss(student: torch.nn.Module, teacher: torch.nn.Module, batch: Any, *,
                                      temperature: float = 1.0, alpha: float = 0.5, k: Optional[int] = None,
                                      ignore_index: int = -100):
    """α·CE + (1 − α)·ULD of `student` against the frozen `teacher` on one `CrossTokenizerCollator` batch.

    CE is the student's next-token cross-entropy (position i predicts label i+1, mean over
    labels other than `ignore_index`); ULD is `cross_tokenizer_kd_loss` over the batch's span
    pairs with both softmaxes at `temperature` (no T² factor), mean over pairs (0 when none).

    Returns:
        `(loss, student_outputs)`: a float32 scalar and the student's raw output.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    missing = [key for key in ("input_ids", "teacher_input_ids", "span_pairs", "labels") if key not in batch]
    if missing:
        raise ValueError(f"cross_tokenizer_distillation_loss: the batch lacks {missing}; CrossTokenizerCollator "
                         "makes such batches")
    outputs = student(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    student_logits = model_logits(outputs)
    first = next(teacher.parameters(), None)
    if first is not None and first.device != student_logits.device:
        teacher.to(student_logits.device)
    teacher.eval()
    with torch.no_grad():
        teacher_logits = model_logits(teacher(input_ids=batch["teacher_input_ids"],
                                              attention_mask=batch.get("teacher_attention_mask")))
    labels = batch["labels"].to(student_logits.device)
    loss = student_logits.new_zeros((), dtype=torch.float32)
    if alpha > 0:
        shifted = student_logits[:, :-1].reshape(-1, student_logits.shape[-1]).float()
        ce = torch.nn.functional.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=ignore_index)
        loss = loss + alpha * torch.nan_to_num(ce, nan=0.0)  # no valid label: no CE term
    if alpha < 1:
        loss = loss + (1.0 - alpha) * cross_tokenizer_kd_loss(
            student_logits, teacher_logits, batch["span_pairs"], k=k, student_temperature=temperature,
            teacher_temperature=temperature)
    return loss, outputs
