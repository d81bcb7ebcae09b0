"""Per-request token sampling, stop-string detection and incremental detokenization.

Everything here is host-side numpy: the engine hands back one logits row per request per step,
and these helpers turn it into a token id and a stream of text deltas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

from enginesmith.runtime.errors import InvalidRequestError

# Cumulative sums of float64 softmax outputs are off by a few ulps, so a set whose true mass is
# exactly top_p (e.g. 0.5 + 0.3 for top_p=0.8) could otherwise sum to 0.79999... and pull in one
# more token than intended.
_TOP_P_TOLERANCE = 1e-9

# Top-p first sorts only this many candidates, widening 16x per miss. Peaked LM distributions
# usually put the nucleus inside a few dozen tokens, so the whole vocabulary is rarely sorted.
_TOP_P_INITIAL_CANDIDATES = 64
_TOP_P_GROWTH = 16

# Tokens of prompt context kept when detokenizing the first generated tokens (as vLLM does), so
# tokenizers whose decoding depends on the preceding token (e.g. SentencePiece leading spaces)
# produce the same text as they would inside the full sequence.
_PROMPT_CONTEXT_TOKENS = 5

_REPLACEMENT_CHAR = "\ufffd"

# Most alternatives a request may ask log-probabilities for (OpenAI's top_logprobs limit).
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives at its position
    (token id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _as_tuple(value: object) -> tuple:
    """Normalize a single item, any iterable, or None into a tuple."""
    if value is None:
        return ()
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        return (value,)
    return tuple(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request and when to stop.

    `stop` and `stop_token_ids` also accept a single value or a list; they are stored as tuples so
    the params stay hashable.
    """

    max_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 disables top-k
    top_p: float = 1.0  # 1.0 disables nucleus sampling
    seed: int | None = None  # None draws fresh OS entropy per request
    stop: Sequence[str] = ()  # a str or any sequence; stored as tuple[str, ...]
    stop_token_ids: Sequence[int] = ()  # an int or any sequence; stored as tuple[int, ...]
    ignore_eos: bool = False
    # Log-probabilities to return per generated token: None = none, 0 = the chosen token's,
    # k = also the k most likely alternatives (see Sampler.logprobs for which distribution).
    logprobs: int | None = None

    def __post_init__(self) -> None:
        self._validate_max_tokens()
        self._validate_temperature()
        self._validate_top_k()
        self._validate_top_p()
        self._validate_seed()
        self._normalize_stop()
        self._normalize_stop_token_ids()
        self._validate_logprobs()
        object.__setattr__(self, "ignore_eos", bool(self.ignore_eos))

    def _validate_max_tokens(self) -> None:
        value = self.max_tokens
        if not _is_int(value) or value < 1:
            raise InvalidRequestError(
                f"max_tokens must be >= 1 (got {value!r}): ask for at least one token"
            )
        object.__setattr__(self, "max_tokens", int(value))

    def _validate_temperature(self) -> None:
        value = self.temperature
        if not _is_real(value) or not math.isfinite(value) or value < 0:
            raise InvalidRequestError(
                f"temperature must be a finite number >= 0 (got {value!r}): "
                "use 0 for greedy decoding or a positive value to sample"
            )
        object.__setattr__(self, "temperature", float(value))

    def _validate_top_k(self) -> None:
        value = self.top_k
        if not _is_int(value) or value < 0:
            raise InvalidRequestError(
                f"top_k must be an integer >= 0 (got {value!r}): use 0 to disable top-k"
            )
        object.__setattr__(self, "top_k", int(value))

    def _validate_top_p(self) -> None:
        value = self.top_p
        # `not 0 < value <= 1` is also true for NaN.
        if not _is_real(value) or not 0 < value <= 1:
            raise InvalidRequestError(
                f"top_p must be in (0, 1] (got {value!r}): use 1.0 to disable nucleus sampling"
            )
        object.__setattr__(self, "top_p", float(value))

    def _validate_seed(self) -> None:
        value = self.seed
        if value is not None and (not _is_int(value) or value < 0):
            raise InvalidRequestError(
                f"seed must be a non-negative integer or None (got {value!r}): "
                "pass a seed >= 0 or omit it"
            )
        object.__setattr__(self, "seed", None if value is None else int(value))

    def _normalize_stop(self) -> None:
        stop = _as_tuple(self.stop)
        for item in stop:
            if not isinstance(item, str) or not item:
                raise InvalidRequestError(
                    f"stop must hold non-empty strings (got {item!r}): "
                    "pass a string or a list of non-empty strings"
                )
        object.__setattr__(self, "stop", stop)

    def _normalize_stop_token_ids(self) -> None:
        ids = _as_tuple(self.stop_token_ids)
        for item in ids:
            if not _is_int(item) or item < 0:
                raise InvalidRequestError(
                    f"stop_token_ids must hold non-negative integer token ids (got {item!r}): "
                    "pass ints from the tokenizer's vocabulary"
                )
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))

    def _validate_logprobs(self) -> None:
        value = self.logprobs
        if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
            raise InvalidRequestError(
                f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None (got {value!r}): "
                "ask for fewer alternatives"
            )
        object.__setattr__(self, "logprobs", None if value is None else int(value))

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature 0, or only one candidate kept)."""
        return self.temperature == 0.0 or self.top_k == 1


class Sampler:
    """Samples token ids for one request, with its own random generator.

    Keep one Sampler per request for its whole lifetime so a seeded request draws the same
    sequence regardless of how it is batched with others.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng: np.random.Generator = np.random.default_rng(params.seed)

    def sample(self, logits: np.ndarray) -> int:
        """Pick the next token id from a 1-D logits vector of shape [vocab]."""
        logits = _check_logits(logits)
        if self.params.greedy:
            return int(np.argmax(logits))
        ids, probs = self._filtered(logits)
        # `probs` is a private temporary here, so the CDF can overwrite it.
        index = self._draw_from_cdf(np.cumsum(probs, out=probs))
        return index if ids is None else int(ids[index])

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution `sample` draws from: float64 [vocab], zero outside the kept set.

        Greedy params give a one-hot vector at the argmax.
        """
        logits = _check_logits(logits)
        if self.params.greedy:
            out = np.zeros(logits.shape[0], dtype=np.float64)
            out[int(np.argmax(logits))] = 1.0
            return out
        ids, probs = self._filtered(logits)
        if ids is None:
            return probs
        out = np.zeros(logits.shape[0], dtype=np.float64)
        out[ids] = probs
        return out

    def logprobs(self, logits: np.ndarray, token_id: int, num_top: int) -> TokenLogprob:
        """TOKEN_ID's log-probability and the NUM_TOP most likely tokens' ones.

        Sampled requests: the distribution `sample` draws from (temperature, top-k and top-p
        applied, renormalized), so tokens outside the kept set have -inf and are never listed
        as alternatives. Greedy requests: the model's own distribution (softmax of the raw
        logits), since the one-hot distribution argmax "draws" from says nothing.
        """
        logits = _check_logits(logits)
        if self.params.greedy:
            logp = logits.astype(np.float64)
            logp -= logp.max()
            logp -= math.log(float(np.exp(logp).sum()))
        else:
            with np.errstate(divide="ignore"):
                logp = np.log(self.probabilities(logits))
        chosen = float(logp[token_id])
        if num_top <= 0:
            return TokenLogprob(int(token_id), chosen)
        k = min(num_top, logp.shape[0])
        head = np.argpartition(logp, logp.shape[0] - k)[logp.shape[0] - k :]
        head = head[np.argsort(-logp[head], kind="stable")]
        top = tuple((int(i), float(logp[i])) for i in head if math.isfinite(logp[i]))
        return TokenLogprob(int(token_id), chosen, top)

    def draw(self, probs: np.ndarray) -> int:
        """Draw an index from an arbitrary non-negative weight vector with this request's rng.

        For distributions built outside `probabilities` (e.g. speculative-decoding residuals).
        """
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim != 1 or probs.size == 0:
            raise ValueError(f"probs must be a non-empty 1-D vector (got shape {probs.shape})")
        if (probs < 0).any():
            raise ValueError("cannot sample: probabilities must be non-negative")
        return self._draw_from_cdf(np.cumsum(probs))

    def _filtered(self, logits: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Kept token ids (None = the whole vocabulary, in order) and their probabilities.

        Applies temperature, then top-k, then top-p; the probabilities are renormalized.
        """
        # One float64 copy, then in-place math: fresh vocab-sized arrays cost more than the math.
        scaled = np.divide(logits, self.params.temperature, dtype=np.float64)
        ids = _top_k_ids(scaled, self.params.top_k)
        probs = _softmax_(scaled if ids is None else scaled[ids])
        if self.params.top_p < 1.0:
            keep = _nucleus(probs, self.params.top_p)
            ids = keep if ids is None else ids[keep]
            probs = probs[keep]
            probs /= probs.sum()
        return ids, probs

    def _draw_from_cdf(self, cdf: np.ndarray) -> int:
        # Inverse-CDF draw on an unnormalized CDF; side="right" never lands on a zero-weight entry.
        total = float(cdf[-1])
        if not total > 0 or not math.isfinite(total):
            raise ValueError("cannot sample: probabilities sum to zero or are not finite")
        index = int(np.searchsorted(cdf, self.rng.random() * total, side="right"))
        return min(index, cdf.shape[0] - 1)


def _check_logits(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 1 or logits.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D [vocab] vector (got {logits.shape})")
    return logits


def _softmax_(x: np.ndarray) -> np.ndarray:
    """Softmax computed in place in `x` (which must be a float64 temporary); returns `x`."""
    peak = x.max()
    # NaN or +inf logits would silently turn the whole distribution into NaN.
    if not math.isfinite(peak):
        raise ValueError(f"logits have no finite maximum (max is {peak}); the model output is bad")
    x -= peak
    np.exp(x, out=x)
    x /= x.sum()
    return x


def _top_k_ids(x: np.ndarray, k: int) -> np.ndarray | None:
    """Indices of the k largest entries (unordered), or None when top-k keeps everything."""
    n = x.shape[0]
    if k <= 0 or k >= n:
        return None
    return np.argpartition(x, n - k)[n - k :]


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Positions (into `probs`) of the smallest highest-probability set with mass >= top_p."""
    n = probs.shape[0]
    target = top_p - _TOP_P_TOLERANCE
    m = min(n, _TOP_P_INITIAL_CANDIDATES)
    while True:
        # Sort only the m most likely tokens; widen the window until it holds enough mass.
        head = np.argpartition(probs, n - m)[n - m :] if m < n else None
        order = np.argsort(probs if head is None else probs[head])[::-1]
        head = order if head is None else head[order]
        cumulative = np.cumsum(probs[head])
        if cumulative[-1] >= target or m == n:
            count = int(np.searchsorted(cumulative, target, side="left")) + 1
            return head[: min(count, m)]
        m = min(n, m * _TOP_P_GROWTH)


class StopChecker:
    """Finds stop strings in streamed text without ever emitting part of one.

    Text that could be the start of a stop string is held back until later text either
    completes the stop string (it is then dropped) or rules it out (it is then released).
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop: tuple[str, ...] = tuple(s for s in stop if s)
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the stream, if any
        self._pending = ""

    def feed(self, new_text: str) -> tuple[str, bool]:
        """Add generated text; return (text safe to emit now, whether a stop string matched)."""
        if self.stopped:
            return "", True
        text = self._pending + new_text
        if not self.stop:
            return text, False
        cut = self._first_match(text)
        if cut is not None:
            self._pending = ""
            self.stopped = True
            return text[:cut], True
        held = self._held_back_length(text)
        self._pending = text[len(text) - held :] if held else ""
        return text[: len(text) - held], False

    def flush(self) -> str:
        """Release held-back text at the end of generation (empty after a stop match)."""
        text, self._pending = self._pending, ""
        return "" if self.stopped else text

    def _first_match(self, text: str) -> int | None:
        """Start of the earliest complete stop string in `text`, recording which one it was."""
        best: int | None = None
        for s in self.stop:
            at = text.find(s)
            if at != -1 and (best is None or at < best):
                best, self.matched = at, s
        return best

    def _held_back_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas, one token at a time.

    Decodes only a short window starting at `prefix_offset` (the vLLM / HF TextStreamer
    approach): the window's text before `read_offset` was already emitted, so the delta is
    whatever the new tokens add. A delta is held back while the window ends in U+FFFD, i.e. while
    a multi-byte character is still split across tokens.
    """

    def __init__(
        self, decode: Callable[[list[int]], str], prompt_ids: list[int] | None = None
    ) -> None:
        self._decode = decode
        self._ids: list[int] = list(prompt_ids or [])
        self._num_prompt = len(self._ids)
        self.read_offset = len(self._ids)
        self.prefix_offset = max(0, self.read_offset - _PROMPT_CONTEXT_TOKENS)

    @property
    def token_ids(self) -> list[int]:
        """The generated ids so far (without the prompt)."""
        return self._ids[self._num_prompt :]

    def add(self, token_id: int) -> str:
        """Append one generated token and return the newly completed text (maybe empty)."""
        self._ids.append(int(token_id))
        return self._emit(allow_incomplete=False)

    def flush(self) -> str:
        """Return text still held back at the end (e.g. a truly invalid trailing byte)."""
        return self._emit(allow_incomplete=True)

    def _emit(self, allow_incomplete: bool) -> str:
        if self.read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self._ids[self.prefix_offset :])
        if len(full_text) <= len(prefix_text):
            return ""
        if full_text.endswith(_REPLACEMENT_CHAR) and not allow_incomplete:
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self._ids)
        return full_text[len(prefix_text) :]
