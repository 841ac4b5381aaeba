"""`CopyHead`: a pointer-generator's copy distribution (See et al. 2017) beside a small LM's vocabulary.

A 4-layer LM trained from scratch for a few minutes does not learn to copy words from its prompt (the
question's noun, a number or a colour of the scene line; docs/EXPERIMENTS.md E36). The copy head gives it
a direct route: from the last hidden state h_t it attends over the positions read so far (s <= t, text
tokens only: no image, region or padding slot), with keys from their last hidden states, and puts that
attention on the tokens at those positions (a key also reads the embedding of the token before its position:
which word a number or a colour follows, without waiting for the LM to learn a previous-token head). A
gate mixes it with the LM head's softmax:

    p(v | t) = (1 - g_t) softmax(lm_head(h_t))_v + g_t sum_{s <= t, x_s = v} a_ts,
    g_t = sigmoid(w . h_t + b + m max_s score_ts)

The gate also reads how well the best source matches (m, learnt from 0): with nothing to copy the LM
generates instead.

A score also has an identity term, an induction head built in: a first attention (its own query and keys)
picks the subject the step is about (the question's noun), and a source scores by how much the token before
it IS that word (cosine of input embeddings, times a learnt gain). Without it, a 4-layer LM's copy query
found "a number" but not "the number after `square`": its hidden state does not carry the noun's identity to
the answer (docs/EXPERIMENTS.md E37):

    score_ts = q_t . k_s / sqrt(d) + gamma l_t cos(m_t, e(x_{s-1})),   l_t = sigmoid(w' . h_t + b'),
    m_t = sum_u b_tu e(x_u),   b_t = softmax_u(q'_t . k'_u / sqrt(d) - slope (t - u))

The per-query gate l_t lets a step that copies something else (the question's words into a `refer` phrase)
turn the look-up off: v34, without it, lost 0.05-0.09 REC.

The result is returned as log-probabilities, which every consumer of logits (the LM loss, softmax,
sampling, teacher-forced scores) reads unchanged. A key at s sees the tokens up to s, so a word is copied
from what precedes it: the scene line writes "circle 2" and "cross blue" for that reason.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import torch
import torch.nn.functional as F
from torch import nn

GATE_INIT = -2.0
"""Initial gate bias: the LM generates (g ~ 0.12) until the copy is learnt."""

IDENTITY_GAIN_INIT = 4.0
"""Initial gain of the identity term: large enough that the subject attention learns from the first step."""

IDENTITY_GATE_INIT = 2.0
"""Initial bias of the per-query identity gate (sigmoid 0.88): open, so that look-ups learn from the start."""

RECENCY_INIT = -3.0
"""The subject attention's learnt recency slope before softplus (~0.05 logits per token back): of the nouns
after "How many", the last question's is the one asked."""


@dataclass
class CopyKeys:
    """What the sources of (B, S) positions offer a query: content keys (B, S, d) from their hidden states and
    the tokens before them, subject keys (B, S, d) for the first attention, and the unit-norm input embeddings
    (B, S, D) of their own tokens and of the tokens before them."""

    content: torch.Tensor
    subject: torch.Tensor
    own: torch.Tensor
    previous: torch.Tensor

    def extended(self, other: CopyKeys) -> CopyKeys:
        """These sources followed by `other`'s (along S)."""
        return CopyKeys(
            *(torch.cat([a, b], dim=1) for a, b in zip(astuple(self), astuple(other), strict=True))
        )


class CopyHead(nn.Module):
    """Hidden states (..., D) -> copy queries and keys (..., d) and the copy gate logit (...)."""

    def __init__(self, hidden_size: int, dim: int = 64) -> None:
        super().__init__()
        self.query = nn.Linear(hidden_size, dim)
        self.key = nn.Linear(hidden_size, dim)
        self.previous_key = nn.Linear(hidden_size, dim, bias=False)
        self.gate = nn.Linear(hidden_size, 1)
        nn.init.constant_(self.gate.bias, GATE_INIT)
        self.match_gain = nn.Parameter(torch.zeros(()))
        self.subject_query = nn.Linear(hidden_size, dim)
        self.subject_key = nn.Linear(hidden_size, dim)
        self.subject_previous_key = nn.Linear(hidden_size, dim, bias=False)
        self.identity_gain = nn.Parameter(torch.tensor(IDENTITY_GAIN_INIT))
        self.identity_gate = nn.Linear(hidden_size, 1)  # per query: is this step a look-up?
        nn.init.constant_(self.identity_gate.bias, IDENTITY_GATE_INIT)
        self.subject_recency = nn.Parameter(torch.tensor(RECENCY_INIT))
        self.scale = dim**-0.5

    def keys(
        self, hidden: torch.Tensor, own_embeddings: torch.Tensor, previous_embeddings: torch.Tensor
    ) -> CopyKeys:
        """The `CopyKeys` of (B, S) positions from their last hidden states and the input embeddings of their
        own tokens and of the tokens before them (all (B, S, D))."""
        return CopyKeys(
            content=self.key(hidden) + self.previous_key(previous_embeddings),
            subject=self.subject_key(hidden) + self.subject_previous_key(previous_embeddings),
            own=F.normalize(own_embeddings.float(), dim=-1),
            previous=F.normalize(previous_embeddings.float(), dim=-1),
        )

    def sequence_keys(self, hidden: torch.Tensor, ids: torch.Tensor, embed: nn.Module) -> CopyKeys:
        """The `CopyKeys` of every position of (B, T) `ids` read into (B, T, D) `hidden` (`embed`: the LM's
        input embeddings; the first position's "previous" token is itself)."""
        own = embed(ids).to(hidden.dtype)
        previous = torch.cat([own[:, :1], own[:, :-1]], dim=1)
        return self.keys(hidden, own, previous)

    def scores(
        self, hidden: torch.Tensor, keys: CopyKeys, allowed: torch.Tensor, distance: torch.Tensor
    ) -> torch.Tensor:
        """(B, Q, S) scores of Q queries per row ((B, Q, D) last hidden states) over the row's S sources;
        allowed (B, Q, S) bool: the sources each query reads (the subject attention reads them too);
        distance (1 or B, Q, S): how many positions back each source is from each query."""
        content = torch.bmm(self.query(hidden), keys.content.transpose(1, 2)) * self.scale
        subject_scores = torch.bmm(self.subject_query(hidden), keys.subject.transpose(1, 2)) * self.scale
        subject_scores = subject_scores.float() - F.softplus(self.subject_recency) * distance
        attention = subject_scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        subject = F.normalize(torch.bmm(attention, keys.own), dim=-1)  # (B, Q, D): the word asked about
        identity = torch.bmm(subject, keys.previous.transpose(1, 2))  # does the token before s match it?
        gate = torch.sigmoid(self.identity_gate(hidden).float())  # (B, Q, 1)
        return content.float() + self.identity_gain * gate * identity

    def mix(
        self, logits: torch.Tensor, hidden: torch.Tensor, scores: torch.Tensor, source_ids: torch.Tensor,
        allowed: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """(P, V) log-probabilities of the mixture at P positions: logits (P, V) the LM head's, hidden (P, D)
        their last hidden states, scores (P, S) their attention scores over S sources, source_ids (P, S)
        the tokens there, allowed (P, S) bool the sources each reads."""
        masked = scores.float().masked_fill(~allowed, float("-inf"))
        attention = masked.softmax(-1).nan_to_num(0.0)
        copy = torch.zeros_like(logits, dtype=torch.float32).scatter_add_(1, source_ids, attention)
        best = masked.amax(-1, keepdim=True).nan_to_num(0.0, neginf=0.0)  # how well the best source matches
        gate = self.gate(hidden).float() + self.match_gain * best
        generate = F.logsigmoid(-gate) + logits.float().log_softmax(-1)
        copied = F.logsigmoid(gate) + copy.clamp(min=1e-12).log()
        return torch.logaddexp(generate, copied).to(logits.dtype)

    def mix_sequences(
        self, logits: torch.Tensor, hidden: torch.Tensor, ids: torch.Tensor, readable: torch.Tensor,
        rows: torch.Tensor, cols: torch.Tensor, embed: nn.Module,
    ) -> torch.Tensor:  # fmt: skip
        """Teacher forcing: (P, V) mixture log-probs at positions (rows, cols) (P,) of (B, T) sequences.

        logits: (P, V) the LM head's there; hidden: (B, T, D) all last hidden states; ids: (B, T) the input
        tokens; readable: (B, T) bool, the positions that may be copied from (text tokens, not padding);
        embed: the LM's input embeddings. Position (b, t) reads the sources s <= t of row b."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        distance = (positions[:, None] - positions[None, :])[None]  # (1, T, T): query t, source s
        causal = readable[:, None, :] & (distance >= 0)  # (B, T, T)
        scores = self.scores(hidden, self.sequence_keys(hidden, ids, embed), causal, distance)
        return self.mix(logits, hidden[rows, cols], scores[rows, cols], ids[rows], causal[rows, cols])


class CopySources:
    """Decoding: the keys, tokens and readability of every position each row has read so far (B, S)."""

    def __init__(
        self,
        head: CopyHead,
        embed: nn.Module,
        hidden: torch.Tensor,
        ids: torch.Tensor,
        readable: torch.Tensor,
    ) -> None:
        self.head, self.embed = head, embed
        self.keys, self.ids, self.readable = head.sequence_keys(hidden, ids, embed), ids, readable.clone()

    def append(self, hidden: torch.Tensor, ids: torch.Tensor, readable: torch.Tensor) -> None:
        """One more position per row: (B, D) its hidden state, (B,) its token, (B,) bool copyable."""
        own = self.embed(ids[:, None]).to(hidden.dtype)
        previous = self.embed(self.ids[:, -1:]).to(hidden.dtype)  # the token before the new position
        self.keys = self.keys.extended(self.head.keys(hidden[:, None], own, previous))
        self.ids = torch.cat([self.ids, ids[:, None]], dim=1)
        self.readable = torch.cat([self.readable, readable[:, None]], dim=1)

    def forget_last(self, row: int) -> None:
        """The row's last position is taken back (a retracted `<box>`): it is no longer read."""
        self.readable[row, -1] = False

    def mix(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """(B, V) mixture log-probs of the next token from (B, V) LM logits and (B, D) last hidden states."""
        count = self.ids.shape[1]  # the query is the last position read
        distance = (count - 1 - torch.arange(count, device=self.ids.device))[None, None]
        scores = self.head.scores(hidden[:, None], self.keys, self.readable[:, None], distance)[:, 0]
        return self.head.mix(logits, hidden, scores, self.ids, self.readable)


def language_logits(
    model, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
    where: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The next-token logits of `model` (the grounded model) from its last hidden states (B, T, D): (B, T, V)
    at every position, or (P, V) at the positions `where` (B, T - 1) bool marks (row-major), the LM head's
    alone or, with a copy head, the mixture's log-probabilities. input_ids: (B, T) the tokens read (image and
    region slots hold the image token, which is never copied); attention_mask: (B, T) (None: all read)."""
    lm_head = model.base_llava.lm_head
    if model.copy_head is None:
        return lm_head(hidden) if where is None else lm_head(hidden[:, :-1][where])
    if where is None:
        rows, cols = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device).nonzero(
            as_tuple=True
        )
    else:
        rows, cols = where.nonzero(as_tuple=True)
    readable = input_ids != model.image_token_id
    if attention_mask is not None:
        readable = readable & attention_mask.bool()
    embed = model.base_llava.get_input_embeddings()
    mixed = model.copy_head.mix_sequences(
        lm_head(hidden[rows, cols]), hidden, input_ids, readable, rows, cols, embed
    )
    return mixed if where is not None else mixed.view(*input_ids.shape, -1)
