"""Structured output within its token budget: a short way to finish a constraint from where the
output stands, and the guard that keeps every token a constrained sequence takes on a path that
still fits the tokens it has left.

``shortest_completion`` walks the constraint's own token transitions (llguidance's matcher, on a
copy), one token at a time, toward a state where the output may end: of the tokens it tries (one
letter, one upper-case letter and one digit for their classes, every other ASCII character, the
tokens made only of ``"]}),:``, and every allowed token where a state allows only a few, such as a
property name llguidance forces), it takes one after which the output may end, else one that
changes the state and closes the most. Every completion it returns is a sequence of tokens the
matcher took, so it always finishes the output; it is short, not always the shortest one.

``BudgetGuard`` is one sequence's use of it. At the first step it measures a completion: longer than
the whole budget, the guard stands aside (the answer is cut, "length", as without it). While the
budget is far from that length the sampler chooses freely and the guard measures again every
``PERIOD`` tokens; once the tokens left come within twice the last length plus ``WATCH``, each token
the sampler draws is checked: it is kept when a completion still fits after it, otherwise it is set
aside and the sampler draws again among the rest, and after ``TRIES`` refusals the next token of the
known completion is taken. So the answer ends complete whenever the completion measured at the
first step fit the budget, and a far budget changes nothing.
"""

from __future__ import annotations

import string

import numpy as np

WATCH = 16  # tokens of room, past twice the shortest completion, from where every token is checked
PERIOD = 16  # tokens between measures while the budget is far
TRIES = 4  # draws refused before the shortest completion's own next token is taken
FEW = 16  # a state that allows at most this many tokens has every one of them tried

_CLASSES = (string.ascii_lowercase, string.ascii_uppercase, string.digits, string.whitespace)
SPACE = 3  # the class of whitespace characters: each of them is tried on its own
CLOSERS = b'"]}),:'  # what ends strings, arrays, objects, groups, and separates their parts


class Vocabulary:
    """The tokens a search tries, read once from llguidance's tokenizer: single ASCII characters
    (the representatives of letters and digits marked) and tokens made of punctuation only."""

    def __init__(self, tokenizer, vocab_size: int):
        self.vocab_size = vocab_size
        singles, classes, punctuation, first = [], [], [], []
        self.text: dict[int, bytes] = {}
        self.stop_like: set[int] = set()
        for token in range(vocab_size):
            if tokenizer.is_special_token(token):
                self.stop_like.add(token)
                continue
            text = self.text[token] = tokenizer.decode_bytes([token])
            if len(text) == 1 and text[0] < 128:
                singles.append(token)
                kind = next((i for i, chars in enumerate(_CLASSES) if chr(text[0]) in chars), -1)
                classes.append(-1 if kind == SPACE else kind)
            elif len(text) > 1 and all(b in CLOSERS for b in text):
                punctuation.append(token)
                first.append(text[0])
        self.singles = np.array(singles, dtype=np.int64)
        self.single_class = np.array(classes, dtype=np.int64)
        self.single_byte = np.array([tokenizer.decode_bytes([t])[0] for t in singles], dtype=np.int64)
        self.punctuation = np.array(punctuation, dtype=np.int64)
        self.punctuation_first = np.array(first, dtype=np.int64)
        self.closers = np.array([t for t in singles if self.text[t][0] in CLOSERS], dtype=np.int64)
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def signature(self, matcher) -> bytes:
        """The packed mask of what ``matcher`` allows next: the key under which states are merged."""
        matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        return self._bits.tobytes()

    def allowed(self, signature: bytes) -> np.ndarray:
        return np.unpackbits(np.frombuffer(signature, dtype=np.uint8), count=self.vocab_size, bitorder="little").view(bool)


def ended(matcher) -> bool:
    """Whether the output may end where ``matcher`` stands."""
    return matcher.is_accepting() or matcher.is_stopped()


def shortest_completion(matcher, vocabulary: Vocabulary, within: int) -> tuple[int, ...] | None:
    """A short sequence of at most ``within`` tokens that takes ``matcher``'s state to one where the
    output may end (``matcher`` itself is left as it was); None when the walk finds none that short.
    At each state the walk takes, of the tokens it tries, one after which the output may end; else
    one that changes the state (its mask), closing the most (``"``, ``]``, ``}``, ``)``) and leaving
    the fewest tokens allowed after it; else the first one tried (a counted run goes on)."""
    state, path = matcher.deep_copy(), []
    signature = vocabulary.signature(state)
    while not ended(state):
        if len(path) >= within:
            return None
        best = None
        for child, token, child_signature in _children(state, signature, vocabulary):
            if ended(child):
                best = (child, token, child_signature)
                break
            allowed = vocabulary.allowed(child_signature)
            text = vocabulary.text[token]
            rank = (
                child_signature != signature,  # it changes the state
                not any(b in b" \t\n" for b in text),  # whitespace is the last resort
                any(b in b'"]})' for b in text),  # it closes something
                bool(allowed[vocabulary.closers].any()),  # something may close after it
                -int(np.count_nonzero(allowed)),  # the fewest tokens allowed after it
            )
            if best is None or rank > best[3]:
                best = (child, token, child_signature, rank)
        if best is None:
            return None
        state, signature = best[0], best[2]
        path.append(best[1])
    return tuple(path)


def _children(state, signature: bytes, vocabulary: Vocabulary):
    """(state after the token, the token, its signature) for each token tried from ``state``."""
    allowed = vocabulary.allowed(signature)
    if np.count_nonzero(allowed) <= FEW:
        tried = np.flatnonzero(allowed)
    else:
        on = allowed[vocabulary.singles]
        singles = vocabulary.singles[on][_first_of_class(vocabulary.single_class[on])]
        tried = np.concatenate([singles, vocabulary.punctuation[allowed[vocabulary.punctuation]]])
    for token in tried:
        if int(token) not in vocabulary.stop_like:
            yield _child(state, int(token), vocabulary)


def _first_of_class(classes: np.ndarray) -> np.ndarray:
    """bool: each token without a class, and the first of each class."""
    keep = classes < 0
    for kind in np.unique(classes[classes >= 0]):
        keep[np.flatnonzero(classes == kind)[0]] = True
    return keep


def _child(state, token: int, vocabulary: Vocabulary):
    child = state.deep_copy()
    child.consume_token(token)
    return child, token, vocabulary.signature(child)


class BudgetGuard:
    """One constrained sequence's guard: see the module's docstring."""

    def __init__(self, matcher, vocabulary: Vocabulary, stop_ids: frozenset[int], first: dict | None = None):
        self.matcher = matcher
        self.vocabulary = vocabulary
        self.stop_ids = stop_ids
        self.standing_aside = False  # the budget never allowed a complete answer
        self.plan: tuple[int, ...] | None = None  # a completion from the current state, when known
        self.measured: int | None = None  # the length of the last completion measured
        self.since = 0  # tokens taken since that measure
        self._plans: dict[int, tuple[int, ...]] = {}  # completions after the tokens checked this step
        self._first = first if first is not None else {}  # budget -> the first measure, shared by a request's sequences

    def choose(self, sampler, logits: np.ndarray, remaining: int) -> int:
        """The next token from ``sampler`` over the masked ``logits``, with ``remaining`` tokens left
        in the budget (this one included)."""
        self._plans = {}
        if not self.standing_aside and self.plan is None:
            if self.measured is None:  # the first step
                if remaining not in self._first:
                    self._first[remaining] = shortest_completion(self.matcher, self.vocabulary, remaining)
                self._set(self._first[remaining])
            elif self.since >= PERIOD or remaining <= 2 * self.measured + WATCH:
                self._set(shortest_completion(self.matcher, self.vocabulary, remaining))
            self.standing_aside = self.measured is None  # no completion fits: the budget is too small
        if self.standing_aside or remaining > 2 * self.measured + WATCH:
            return sampler(logits)
        for _ in range(TRIES):
            token = sampler(logits)
            if token in self.stop_ids or (self.plan and token == self.plan[0]) or self._fits(token, remaining - 1):
                return token
            logits = logits.copy()
            logits[token] = -np.inf
            if not np.isfinite(logits).any():
                break
        if self.plan:
            return self.plan[0]
        return max(self.stop_ids, key=lambda t: logits[t])  # the output may end here: it ends

    def advanced(self, token: int) -> None:
        """The sequence took ``token`` (the matcher has consumed it)."""
        if self.plan and token == self.plan[0]:
            self.plan = self.plan[1:]
        else:
            self.plan = self._plans.get(token)
        self.since += 1

    def _set(self, plan: tuple[int, ...] | None) -> None:
        self.plan = plan
        self.measured = len(plan) if plan is not None else None
        self.since = 0

    def _fits(self, token: int, left: int) -> bool:
        child = self.matcher.deep_copy()
        child.consume_token(token)
        found = shortest_completion(child, self.vocabulary, left)
        if found is None:
            return False
        self._plans[token] = found
        self.measured, self.since = len(found), 0
        return True
