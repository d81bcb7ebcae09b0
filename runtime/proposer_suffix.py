"""SuffixDecoding drafts (Oliaro et al., arXiv 2411.04975): suffix tries over the request's
prompt and output and over the outputs of earlier requests; the draft follows the most
frequent continuation of the longest matching suffix, as long as the continuation stays
likely (product of child frequencies >= MIN_TOKEN_PROB) and no longer than
MAX_SPEC_FACTOR x the match length (a short match predicts less). No engine call; drafts
are a point mass for rejection sampling.

A trie holds every substring of up to DEPTH tokens with its count; appending a token extends
the DEPTH - 1 suffixes that end at the previous token, so building is O(DEPTH) per token.
"""

from __future__ import annotations

from collections.abc import Sequence

from enginesmith.runtime.spec_proposer import Draft, SpecRequest

DEPTH = 24  # longest substring kept: match + continuation
MAX_MATCH = 12  # longest context suffix looked up
MIN_TOKEN_PROB = 0.1  # stop the draft when its estimated probability drops below this
MAX_SPEC_FACTOR = 2.0  # draft at most this many tokens per matched token
GLOBAL_MAX_NODES = 2_000_000  # the cross-request trie stops growing here (memory bound)


class _Node:
    __slots__ = ("best", "children", "count", "scanned", "total")

    def __init__(self) -> None:
        self.count = 0
        self.children: dict[int, _Node] = {}
        self.total = 0  # sum of the children's counts (kept by extend)
        # The most frequent child's token (the first inserted on ties, as max()) as of when the
        # children's counts summed to `scanned`: a draft rescans a node's children only after
        # they changed, not at every token of every round.
        self.best = -1
        self.scanned = 0

    def best_child(self) -> tuple[int, _Node]:
        if self.scanned != self.total:
            self.best = max(self.children.items(), key=lambda kv: kv[1].count)[0]
            self.scanned = self.total
        return self.best, self.children[self.best]


class SuffixTrie:
    """Counts of every substring of up to DEPTH tokens of the sequences appended to it."""

    def __init__(self, depth: int = DEPTH) -> None:
        self.depth = depth
        self.root = _Node()
        self.num_nodes = 0
        self._active: list[_Node] = []  # nodes of the suffixes of length 1.. ending at the end

    def extend(self, tokens: Sequence[int]) -> None:
        # The hot loop of suffix drafting (up to DEPTH nodes per token): locals only.
        depth, root, active, created = self.depth, self.root, self._active, 0
        for token in tokens:
            grown: list[_Node] = []
            keep = grown.append
            for node in (root, *active):
                child = node.children.get(token)
                if child is None:
                    child = node.children[token] = _Node()
                    created += 1
                child.count += 1
                node.total += 1
                keep(child)
            if len(grown) >= depth:  # a substring of DEPTH tokens does not grow further
                grown.pop()
            active = grown
        self._active = active
        self.num_nodes += created

    def end_sequence(self) -> None:
        """The next tokens start a new sequence (no substring spans the boundary)."""
        self._active = []

    def lookup(self, context: Sequence[int], max_draft: int) -> tuple[list[int], float]:
        """The draft after the longest suffix of CONTEXT found here, and its score (the sum of
        its tokens' estimated probabilities: expected accepted tokens)."""
        for m in range(min(MAX_MATCH, len(context), self.depth - 1), 0, -1):
            node: _Node | None = self.root
            for token in context[len(context) - m :]:
                node = node.children.get(token) if node is not None else None
                if node is None:
                    break
            if node is None or not node.children:
                continue
            return self._follow(node, min(max_draft, int(MAX_SPEC_FACTOR * m), self.depth - m))
        return [], 0.0

    def lookup_own(self, max_draft: int) -> tuple[list[int], float]:
        """lookup(context) when this trie holds exactly CONTEXT as its one open sequence: the
        nodes of its suffixes are the active ones, so no walk from the root is needed."""
        active = self._active
        for m in range(min(MAX_MATCH, len(active)), 0, -1):
            node = active[m - 1]
            if node.children:
                return self._follow(node, min(max_draft, int(MAX_SPEC_FACTOR * m), self.depth - m))
        return [], 0.0

    @staticmethod
    def _follow(node: _Node, limit: int) -> tuple[list[int], float]:
        draft: list[int] = []
        prob, score = 1.0, 0.0
        while len(draft) < limit and node.children:
            token, child = node.best_child()
            prob *= child.count / node.total
            if prob < MIN_TOKEN_PROB:
                break
            draft.append(token)
            score += prob
            node = child
        return draft, score


class SuffixProposer:
    name = "suffix"
    is_model = False

    def __init__(self, max_draft_len: int | None = None) -> None:
        self.global_trie = SuffixTrie()
        self._tries: dict[str, tuple[SuffixTrie, int]] = {}  # request id -> trie, tokens in it
        # A request's own trie grows by every token it emits: keep it only as deep as a lookup
        # reaches (the longest match, then the longest draft); deeper nodes would never be
        # read. The drafts are the same as with DEPTH for any max_draft <= max_draft_len.
        self.own_depth = min(DEPTH, MAX_MATCH + 1 + (max_draft_len or DEPTH))

    def _request_trie(self, r: SpecRequest) -> SuffixTrie:
        trie, inserted = self._tries.get(r.request_id, (None, 0))
        if trie is None:
            trie = SuffixTrie(self.own_depth)
        trie.extend(r.token_ids[inserted:])
        self._tries[r.request_id] = (trie, len(r.token_ids))
        return trie

    def propose(self, requests: Sequence[SpecRequest]) -> dict[str, Draft]:
        drafts = {}
        for r in requests:
            own, own_score = self._request_trie(r).lookup_own(r.max_draft)
            past, past_score = (
                self.global_trie.lookup(r.token_ids, r.max_draft)
                if self.global_trie.num_nodes
                else ([], 0.0)
            )
            tokens = own if own_score >= past_score else past
            if tokens:
                drafts[r.request_id] = Draft(tokens)
        return drafts

    def finish(self, request_id: str, token_ids: list[int], num_prompt_tokens: int) -> None:
        self._tries.pop(request_id, None)
        if self.global_trie.num_nodes < GLOBAL_MAX_NODES:
            self.global_trie.extend(token_ids[num_prompt_tokens:])
            self.global_trie.end_sequence()
