"""Preference tuning: from pairs of replies to one prompt, the one people chose and the one they
rejected, teach a language model to prefer the chosen -- DPO (Rafailov et al. 2023), IPO (Azar et
al. 2023) or the reference-free SimPO (Meng et al. 2024), as dpo.loss says (lmkit.config.DPOConfig).

DPO and IPO compare the model with a frozen reference, the model finetuning starts from. Its
log-probabilities of every reply are computed once, before the first step, and travel in the
batches: no second copy of the weights is held while training (with LoRA the starting model is the
base with its adapters still zero, so the reference is the base), and a resumed run recomputes them
from the starting checkpoint. Rows of a batch interleave each pair's chosen (even rows) and rejected
(odd rows) replies, so splitting a batch between ranks keeps pairs whole.

`lmkit eval PAIRS.jsonl` scores any decoder on pairs: the share whose chosen reply it finds more
likely given the prompt. The headline compares mean log-likelihood per token (a longer reply is not
less likely for being longer); the summed comparison is reported too, and, against --reference,
DPO's implicit reward accuracy and mean margin.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lmkit import chat, corpus, finetune_data
from lmkit.batches import IGNORE, to_device
from lmkit.checkpoint import Checkpoint
from lmkit.config import DPOConfig, RunConfig
from lmkit.device import autocast
from lmkit.errors import CheckpointError, ConfigError, DataError
from lmkit.models import ARCHS
from lmkit.quantize import model_for_decoding
from lmkit.tasks.task import FinetuneSpec, Task, TaskData, pairs_and_val
from lmkit.tokenizer import Tokenizer

Message = dict[str, str]
SCORING_BATCH = 16  # pairs per forward pass when the reference or an evaluation scores them


@dataclass(frozen=True)
class Preference:
    """One prompt (a text, or a conversation ending in a user turn) and two replies to it."""

    prompt: str | list[Message]
    chosen: str
    rejected: str


class PreferenceBatch(NamedTuple):
    """Pairs of replies, interleaved: row 2i is pair i's chosen reply, row 2i + 1 its rejected one."""

    inputs: torch.Tensor  # (2B, T) prompt and reply ids
    targets: torch.Tensor  # (2B, T) the next tokens of the reply; IGNORE on the prompt and padding
    reference: torch.Tensor  # (2B,) summed log-probability of each reply under the reference (0: none)

    @property
    def size(self) -> int:
        return self.inputs.numel()

    def loss_units(self) -> torch.Tensor:
        """(1,) the pairs."""
        return torch.tensor([self.inputs.size(0) // 2], device=self.inputs.device)


# One encoded pair: (chosen ids, chosen learn mask, rejected ids, rejected learn mask, reference
# log-probability of the chosen reply, of the rejected one)
Row = tuple[list[int], list[bool], list[int], list[bool], float, float]


# --- reading ------------------------------------------------------------------------------------

def read_preferences(path: Path) -> list[Preference]:
    """JSONL rows {"prompt", "chosen", "rejected"} with text values, or the chat form: "messages" (a
    conversation ending in a user turn) and "chosen"/"rejected" assistant replies (text, or an
    assistant message {"role", "content"}).

    Raises:
        DataError: naming the file and line of the first bad row.
    """
    if not corpus.is_jsonl(path):
        raise DataError(f"{path}: preference pairs must be JSONL with \"prompt\" (or \"messages\"), \"chosen\" "
                        "and \"rejected\" fields")
    pairs = [_preference(f"{path}:{n}", line) for n, line in enumerate(corpus.read_text(path).split("\n"), start=1)
             if line.strip()]
    if not pairs:
        raise DataError(f"{path} has no pairs")
    return pairs


def _preference(where: str, line: str) -> Preference:
    record = corpus.json_object(line, where)
    if "messages" in record:
        prompt: str | list[Message] = chat.check_messages(record["messages"], where, needs_assistant=False)
        if prompt[-1]["role"] != "user":
            raise DataError(f"{where}: \"messages\" must end with the user turn the replies answer")
    elif isinstance(record.get("prompt"), str):
        prompt = record["prompt"]
    else:
        raise DataError(f"{where}: needs a \"prompt\" string or a \"messages\" conversation "
                        f"(found: {', '.join(record) or 'none'})")
    return Preference(prompt, _reply(where, record, "chosen"), _reply(where, record, "rejected"))


def _reply(where: str, record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if isinstance(value, list) and len(value) == 1:  # TRL's conversational form: [{"role": "assistant", ...}]
        value = value[0]
    if isinstance(value, dict) and value.get("role") == "assistant":
        value = value.get("content")
    if value is None:
        raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string or an assistant message, not {value!r:.40}")
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def is_preference_file(path: Path) -> bool:
    """PATH is JSONL whose first row has "chosen" and "rejected" fields."""
    if not corpus.is_jsonl(path):
        return False
    first = next((line for line in corpus.read_text(path).split("\n") if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and "chosen" in record and "rejected" in record


# --- encoding -----------------------------------------------------------------------------------

def encode_preferences(pairs: Sequence[Preference], tokenizer: Tokenizer, max_len: int, template: str | None = None
                       ) -> tuple[list[Row], dict[str, int]]:
    """Each pair as two rows the model reads, prompt then reply (its end token included), the reply
    marked to learn: a text prompt as `generate` reads it, a conversation through the chat template.
    A prompt that does not fit loses its beginning (a conversation its oldest turns), keeping at
    least half the context for the reply; a reply loses its end. Pairs whose replies are the same,
    or encode the same after the cut, are left out and counted ("identical"), as are pairs with no
    reply token within the context ("dropped")."""
    form = chat.ChatFormat(tokenizer, template) if any(not isinstance(p.prompt, str) for p in pairs) else None
    rows, counts = [], {"pairs": 0, "identical": 0, "dropped": 0}
    for pair in pairs:
        if pair.chosen == pair.rejected:
            counts["identical"] += 1
            continue
        encode = _encode_text if isinstance(pair.prompt, str) else lambda p, r, _, n: _encode_chat(form, p, r, n)
        chosen, rejected = (encode(pair.prompt, reply, tokenizer, max_len) for reply in (pair.chosen, pair.rejected))
        if not any(chosen[1]) or not any(rejected[1]):
            counts["dropped"] += 1
        elif chosen == rejected:
            counts["identical"] += 1
        else:
            rows.append((*chosen, *rejected, 0.0, 0.0))
    counts["pairs"] = len(rows)
    return rows, counts


def _encode_text(prompt: str, reply: str, tokenizer: Tokenizer, max_len: int) -> tuple[list[int], list[bool]]:
    ids, n_prompt = finetune_data.encode_prompt_completions([finetune_data.PromptCompletion(prompt, reply)],
                                                            tokenizer, max_len)[0]
    return ids, [k >= n_prompt for k in range(len(ids))]


def _encode_chat(form: chat.ChatFormat, messages: list[Message], reply: str, max_len: int
                 ) -> tuple[list[int], list[bool]]:
    reply_tokens = len(form.tokenizer.encode(reply)) + 1
    history, _ = chat.fit_history(form, messages, max_len, min(reply_tokens, max_len // 2))
    encoded = form.encode([*history, {"role": "assistant", "content": reply}])
    start = encoded.turn_ends[-2] if len(encoded.turn_ends) > 1 else 0  # earlier replies are context
    learn = [keep and k >= start for k, keep in enumerate(encoded.learn)]
    return encoded.ids[:max_len], learn[:max_len]


def collate(pad_id: int):  # noqa: ANN201
    """Rows -> a PreferenceBatch, padded on the right."""
    learned = finetune_data.collate_learned(pad_id)

    def collate_rows(rows: Sequence[Row]) -> PreferenceBatch:
        lm = learned([seq for row in rows for seq in ((row[0], row[1]), (row[2], row[3]))])
        return PreferenceBatch(lm.inputs, lm.targets, torch.tensor([v for row in rows for v in row[4:]]))
    return collate_rows


# --- the objective ------------------------------------------------------------------------------

def reply_logps(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R,) summed log-probability of each row's targets, in float32, and (R,) how many there are."""
    logits, _ = model(inputs)  # (R, T, V)
    per_token = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                 reduction="none").view(targets.shape)
    return per_token.sum(dim=1), (targets != IGNORE).sum(dim=1)


@dataclass(frozen=True)
class PairScores:
    """What a loss reads of B pairs: summed log-probabilities under the model and the reference,
    and the reply lengths in tokens; each (B,), chosen and rejected."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @classmethod
    def of(cls, model: nn.Module, batch: PreferenceBatch) -> PairScores:
        logps, tokens = reply_logps(model, batch.inputs, batch.targets)
        return cls(logps[0::2], logps[1::2], batch.reference[0::2].float(), batch.reference[1::2].float(),
                   tokens[0::2].clamp(min=1), tokens[1::2].clamp(min=1))


def pair_losses(s: PairScores, cfg: DPOConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B,) losses and the implicit rewards (B,) of the chosen and rejected replies, as cfg.loss says:
    beta (log pi - log ref) for DPO and IPO, SimPO's beta (mean log pi per token)."""
    beta = cfg.strength
    if cfg.loss == "simpo":
        chosen, rejected = beta * s.chosen / s.chosen_tokens, beta * s.rejected / s.rejected_tokens
        return -F.logsigmoid(chosen - rejected - cfg.gamma), chosen, rejected
    chosen, rejected = s.chosen - s.ref_chosen, s.rejected - s.ref_rejected  # log-ratios to the reference
    if cfg.loss == "ipo":  # on per-token log-ratios, as the IPO authors and TRL compute it
        delta = chosen / s.chosen_tokens - rejected / s.rejected_tokens
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * (chosen - rejected))
    return losses, beta * chosen, beta * rejected


class PreferenceLoss:
    """The loss function of the training loop ((1,) summed over the pairs of a batch), keeping the
    rewards of the pairs it saw for the metrics rows (take)."""

    def __init__(self, cfg: DPOConfig) -> None:
        self.cfg = cfg
        self._sums: torch.Tensor | None = None  # chosen reward, rejected reward, correct, pairs

    def __call__(self, model: nn.Module, batch: PreferenceBatch) -> torch.Tensor:
        losses, chosen, rejected = pair_losses(PairScores.of(model, batch), self.cfg)
        seen = torch.stack([chosen.sum(), rejected.sum(), (chosen > rejected).sum(),
                            torch.tensor(len(chosen), device=chosen.device)]).detach().double()
        self._sums = seen if self._sums is None else self._sums + seen
        return losses.sum().reshape(1)

    def take(self) -> dict[str, float]:
        """The training pairs' mean rewards, margin and reward accuracy since the last take (this rank's)."""
        if self._sums is None:
            return {}
        chosen, rejected, correct, pairs = self._sums.tolist()
        self._sums = None
        return {"reward_chosen": chosen / pairs, "reward_rejected": rejected / pairs,
                "reward_margin": (chosen - rejected) / pairs, "reward_accuracy": correct / pairs}


def metrics_fn(cfg: DPOConfig):  # noqa: ANN201
    """Validation: the loss per pair, the rewards, margin and accuracy, and the chosen replies'
    mean log-likelihood per token (DPO is known to lower it while the margin grows)."""
    @torch.no_grad()
    def metrics(model: nn.Module, batches: Sequence[PreferenceBatch]) -> dict[str, float]:
        totals = torch.zeros(6, dtype=torch.float64)
        for batch in batches:
            scores = PairScores.of(model, batch)
            losses, chosen, rejected = pair_losses(scores, cfg)
            totals += torch.stack([losses.sum(), chosen.sum(), rejected.sum(), (chosen > rejected).sum(),
                                   (scores.chosen / scores.chosen_tokens).sum(),
                                   torch.tensor(len(losses))]).double().cpu()
        loss, chosen, rejected, correct, chosen_logp, pairs = totals.tolist()
        return {"val_loss": loss / pairs, "val_reward_chosen": chosen / pairs, "val_reward_rejected": rejected / pairs,
                "val_reward_margin": (chosen - rejected) / pairs, "val_reward_accuracy": correct / pairs,
                "val_chosen_logp_per_token": chosen_logp / pairs}
    return metrics


# --- the task -----------------------------------------------------------------------------------

def dpo_data(spec: FinetuneSpec, cfg: RunConfig, tokenizer: Tokenizer) -> TaskData:
    train_pairs, val_pairs = pairs_and_val(read_preferences, spec)
    train, counts = encode_preferences(train_pairs, tokenizer, cfg.model.max_seq_len)
    val, _ = encode_preferences(val_pairs, tokenizer, cfg.model.max_seq_len)
    for rows, source in ((train, spec.data), (val, spec.val or spec.data)):
        if not rows:
            raise DataError(f"{source}: no pair has two different replies within the context of "
                            f"{cfg.model.max_seq_len} tokens")
    loss = PreferenceLoss(cfg.dpo)
    left_out = [f"{counts[key]:,} {what}" for key, what in (("identical", "with the same reply twice"),
                                                             ("dropped", "with no reply token in the context"))
                if counts[key]]
    summary = (f"{counts['pairs']:,} training pairs ({cfg.dpo.loss}, beta {cfg.dpo.strength:g})"
               + (f"; left out {' and '.join(left_out)}" if left_out else ""))
    return TaskData(train, val, collate(tokenizer.pad_id), loss, metrics_fn(cfg.dpo), {"preferences": counts},
                    summary=summary, tokens_per_row=sum(len(r[0]) + len(r[2]) for r in train) / len(train),
                    step_metrics=loss.take)


@torch.no_grad()
def with_reference(model: nn.Module, data: TaskData, cfg: RunConfig, device: torch.device) -> TaskData:
    """DATA with the reference log-probabilities of every reply: those of MODEL, the starting model,
    in eval mode. SimPO needs none."""
    if cfg.dpo.loss == "simpo":
        return data
    was_training = model.training
    model.eval()

    def scored(rows: list[Row]) -> list[Row]:
        out = []
        for i in range(0, len(rows), SCORING_BATCH):
            chunk = rows[i:i + SCORING_BATCH]
            batch = to_device(data.collate(chunk), device)
            with autocast(device, cfg.train.precision):
                logps, _ = reply_logps(model, batch.inputs, batch.targets)
            pairs = logps.view(-1, 2).tolist()
            out += [(*row[:4], chosen, rejected) for row, (chosen, rejected) in zip(chunk, pairs)]
        return out

    result = replace(data, rows=scored(data.rows), val_rows=scored(data.val_rows))
    model.train(was_training)
    return result


@dataclass(frozen=True)
class PreferenceEvaluation:
    pairs: int
    accuracy: float  # chosen more likely per token than rejected: the headline
    accuracy_summed: float  # ... by summed log-likelihood
    chosen_logp_per_token: float  # mean over pairs
    rejected_logp_per_token: float
    chosen_logp: float  # summed over a reply, mean over pairs
    rejected_logp: float
    left_out: int  # identical replies, or no reply token within the context
    context: int
    reference: str | None = None  # with --reference: DPO's implicit rewards against that checkpoint
    beta: float | None = None
    reward_accuracy: float | None = None
    reward_margin: float | None = None  # beta x mean of (chosen - rejected) log-ratios

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def evaluate_preferences(ckpt: Checkpoint, path: Path, options: Any, device: torch.device
                         ) -> tuple[PreferenceEvaluation, list[dict[str, Any]]]:
    """Preference accuracy of the decoder CKPT on the pairs of PATH (and against options.reference).

    Raises:
        CheckpointError: CKPT is no decoder language model, or the reference's tokenizer differs.
    """
    reference = Checkpoint(Path(options.reference)) if options.reference else None
    for scorer in (ckpt, reference) if reference else (ckpt,):
        if scorer.labels or TASK.name not in ARCHS[scorer.config.model.arch].tasks:
            raise CheckpointError(f"{scorer.path} is a {scorer.config.model.arch} checkpoint for task "
                                  f"{scorer.task!r}; preference pairs are scored by a decoder language model")
    if reference and reference.tokenizer_fingerprint != ckpt.tokenizer_fingerprint:
        raise CheckpointError(f"the reference {reference.path} uses another tokenizer than {ckpt.path}: their "
                              "log-probabilities of a reply cannot be compared")
    tokenizer = ckpt.tokenizer()
    pairs = read_preferences(path)
    rows, counts = encode_preferences(pairs, tokenizer, ckpt.config.model.max_seq_len)
    if not rows:
        raise DataError(f"{path}: no pair has two different replies within the context")
    scores = _score(model_for_decoding(ckpt, device, options.quantize), rows, tokenizer.pad_id, device,
                    options.batch_size)
    per_token = scores[:, 0] / scores[:, 2] > scores[:, 1] / scores[:, 3]
    result = PreferenceEvaluation(
        pairs=len(rows), accuracy=per_token.double().mean().item(),
        accuracy_summed=(scores[:, 0] > scores[:, 1]).double().mean().item(),
        chosen_logp_per_token=(scores[:, 0] / scores[:, 2]).mean().item(),
        rejected_logp_per_token=(scores[:, 1] / scores[:, 3]).mean().item(),
        chosen_logp=scores[:, 0].mean().item(), rejected_logp=scores[:, 1].mean().item(),
        left_out=counts["identical"] + counts["dropped"], context=ckpt.config.model.max_seq_len)
    records = [{"chosen_logp": c, "rejected_logp": r, "chosen_tokens": int(nc), "rejected_tokens": int(nr),
                "prefers_chosen": bool(p)} for (c, r, nc, nr), p in zip(scores.tolist(), per_token.tolist())]
    if reference:
        ref = _score(model_for_decoding(reference, device, options.quantize), rows, tokenizer.pad_id, device,
                     options.batch_size)
        beta = ckpt.config.dpo.strength
        margins = (scores[:, 0] - ref[:, 0]) - (scores[:, 1] - ref[:, 1])
        result = replace(result, reference=str(reference.path), beta=beta,
                         reward_accuracy=(margins > 0).double().mean().item(),
                         reward_margin=beta * margins.mean().item())
    return result, records


@torch.no_grad()
def _score(model: nn.Module, rows: list[Row], pad_id: int, device: torch.device, batch_size: int | None
           ) -> torch.Tensor:
    """(N, 4) float64 per pair: chosen and rejected summed log-probability, chosen and rejected tokens."""
    model.eval()
    out, step = [], batch_size or SCORING_BATCH
    to_batch = collate(pad_id)
    for i in range(0, len(rows), step):
        batch = to_device(to_batch(rows[i:i + step]), device)
        with autocast(device):
            logps, tokens = reply_logps(model, batch.inputs, batch.targets)
        out.append(torch.stack([logps[0::2], logps[1::2], tokens[0::2], tokens[1::2]], dim=1).double().cpu())
    return torch.cat(out)


def check_spec(spec: FinetuneSpec) -> None:
    """Preference tuning starts from a trained model: the one it must not drift far from."""
    if spec.scratch:
        raise ConfigError("--task dpo keeps the starting model as its reference; a fresh random one would teach "
                          "nothing, so leave out --scratch")


TASK = Task(name="dpo", summary="preference tuning on chosen/rejected replies (DPO, IPO, SimPO)",
            data_help='JSONL {"prompt", "chosen", "rejected"}, or {"messages", "chosen", "rejected"}',
            train={"batch_size": 16, "max_steps": 400, "lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 40,
                   "weight_decay": 0.0, "eval_interval": 50, "log_interval": 10, "save_interval": 100_000},
            data=dpo_data, dropout=0.0, reference=with_reference, evaluate=evaluate_preferences,
            recognizes=is_preference_file, distillable=False, chat_template=True, check=check_spec,
            objective="preference (chosen over rejected reply)")
