"""A tree-shaped K/V cache for scoring partial solutions round after round.

Step-level search (``mmprm_infer.integrations.search``) asks the PRM, every
round, for the rewards of partial solutions that extend the ones it scored
the round before by one step.  ``TreeCacheEngine`` keeps the per-layer K/V of
every token it has computed in a radix tree of token ids (one tree per
image context), so a round only runs the tokens no earlier call has seen:

- Each node holds a run of token ids, the absolute position of its first
  token, and per layer the K/V (after RoPE) of those tokens, plus the reward
  p_good the PRM head gives at each of them (a float per token), so a step
  that was scored before needs no recomputation at all.
- Scoring a candidate walks the tree along its token ids (splitting a node
  where the candidate leaves it), then inserts the rest as pending nodes,
  shared with the other candidates of the same call.  A candidate is only
  inserted up to its last reward position: later tokens (a chat template's
  closing tokens) cannot change any reward of a causal model.
- Pending nodes run in waves: every pending node whose parent is computed
  runs in the next forward, packed without padding; the children of one
  parent are one group of ``shared_prefix``'s attention, attending to the
  parent path's K/V (concatenated once per layer) and causally to
  themselves.  Their K/V is written after the path (``append=True``) and
  copied into the new nodes.
- Memory is bounded by ``max_cache_bytes``: after each call the least
  recently used leaves are evicted until the cache fits.

Keys: a tree is chosen by the question's image context (a digest of the
image features, or ``None`` for text), and the cache belongs to one model
and one pair of reward columns (a different model clears it).  Causal
attention makes reuse exact: a token's K/V depends only on the tokens before
it, which are the same along a tree path.

``stats`` (a ``TreeCacheStats``) counts, per call and in total, the tokens
asked for and the tokens actually run through the model.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import threading
from dataclasses import dataclass, field
from typing import cast

import torch

from mmprm_infer.engines.base import EncodedQuestion, Engine, check_finite
from mmprm_infer.engines.fast import FastEngine
from mmprm_infer.engines.shared_prefix import LAYOUT_KWARG, Group, PackedLayout, shared_prefix_attention_enabled
from mmprm_infer.formats.base import RewardColumns
from mmprm_infer.models.adapters import ModelAdapter

__all__ = ["TreeCacheEngine", "TreeCacheStats", "CallStats"]


class _Node:
    """A run of tokens at positions [start, start + len(tokens)) and, once computed, their K/V and rewards."""

    __slots__ = ("parent", "tokens", "start", "children", "keys", "values", "rewards", "last_used", "nbytes",
                 "__weakref__")

    def __init__(self, parent: _Node | None, tokens: list[int], start: int):
        self.parent = parent
        self.tokens = tokens
        self.start = start
        self.children: dict[int, _Node] = {}
        self.keys: list[torch.Tensor] | None = None  # per layer [n, Hkv, D]; None while pending
        self.values: list[torch.Tensor] | None = None
        self.rewards: torch.Tensor | None = None  # [n] float32 p_good at every token
        self.last_used = 0
        self.nbytes = 0

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def computed(self) -> bool:
        return self.rewards is not None

    def path(self) -> list[_Node]:
        """Root-to-self chain, root excluded."""
        chain = []
        node: _Node | None = self
        while node is not None and node.parent is not None:
            chain.append(node)
            node = node.parent
        return chain[::-1]


@dataclass
class CallStats:
    """One ``score`` call: tokens the candidates need (up to their last reward) and tokens computed."""

    candidates: int = 0
    requested_tokens: int = 0  # sum over candidates of (last reward position + 1)
    computed_tokens: int = 0  # tokens run through the model in this call
    forwards: int = 0  # decoder forward passes
    evicted_tokens: int = 0


@dataclass
class TreeCacheStats:
    calls: list[CallStats] = field(default_factory=list)

    @property
    def last(self) -> CallStats:
        return self.calls[-1] if self.calls else CallStats()

    @property
    def requested_tokens(self) -> int:
        return sum(c.requested_tokens for c in self.calls)

    @property
    def computed_tokens(self) -> int:
        return sum(c.computed_tokens for c in self.calls)


class _PathKV:
    """The ``prefix`` of one attention group: a parent path's K/V followed by room for its children.

    ``shared_prefix_attention_forward`` asks ``layer(l, like)`` for a buffer
    whose first ``length`` rows hold the path's K/V and writes the group's new
    K/V after them (``append=True``).  The new rows are copied out layer by
    layer (when the next layer asks, and by ``finish``), so only one layer's
    path copy is alive at a time.
    """

    def __init__(self, path: list[_Node], new_tokens: int):
        self.path = path
        self.length = path[-1].end if path else 0
        self.new_tokens = new_tokens
        self.new_keys: list[torch.Tensor] = []
        self.new_values: list[torch.Tensor] = []
        self._open: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def layer(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._close()
        if layer_idx != len(self.new_keys):
            raise RuntimeError(f"tree cache: layers ran out of order (got {layer_idx}, expected {len(self.new_keys)})")
        hkv, d = like.shape[1], like.shape[2]
        # [Hkv, P, D] storage handed out as [P, Hkv, D] views, as shared_prefix.PrefixKV does.
        k = like.new_empty(hkv, self.length + self.new_tokens, d).transpose(0, 1)
        v = like.new_empty(hkv, self.length + self.new_tokens, d).transpose(0, 1)
        for node in self.path:
            # the path's nodes are computed: their K/V are set
            k[node.start:node.end] = node.keys[layer_idx]  # type: ignore[index]
            v[node.start:node.end] = node.values[layer_idx]  # type: ignore[index]
        self._open = (layer_idx, k, v)
        return k, v

    def _close(self) -> None:
        if self._open is not None:
            _, k, v = self._open
            self.new_keys.append(k[self.length:])
            self.new_values.append(v[self.length:])
            self._open = None

    def finish(self) -> None:
        self._close()


@dataclass
class _Segment:
    node: _Node
    group: int  # index into the forward's groups
    row: int  # packed row of the node's first token


class TreeCacheEngine(Engine):
    """Scores candidates reusing every token's K/V computed by earlier calls (see the module doc).

    ``max_batch_tokens``: tokens per decoder forward (a longer pending node is
    cut into chunks); None: the fast engine's default for the device.
    ``max_cache_bytes``: K/V + rewards kept between calls.  Thread-safe (one
    call at a time).  Importing this module registers it as
    ``engine="tree_cache"`` (one cache per PRM then); or pass an instance.
    """

    name = "tree_cache"

    def __init__(self, max_batch_tokens: int | None = None, max_cache_bytes: int = 1 << 30):
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if max_cache_bytes < 0:
            raise ValueError(f"max_cache_bytes must be >= 0, got {max_cache_bytes}")
        self.max_batch_tokens = max_batch_tokens
        self._budget = max_batch_tokens or 16384
        self.max_cache_bytes = max_cache_bytes
        self.stats = TreeCacheStats()
        self._roots: dict[object, _Node] = {}
        self._owner: tuple | None = None
        self._tick = itertools.count(1)
        self._lock = threading.Lock()
        self.cached_bytes = 0
        self.cached_tokens = 0

    # --- public helpers ----------------------------------------------------
    def clear(self) -> None:
        """Drop every cached token (e.g. after the PRM's weights changed)."""
        with self._lock:
            self._roots.clear()
            self.cached_bytes = 0
            self.cached_tokens = 0

    def num_nodes(self) -> int:
        count = 0
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            count += 1
            stack.extend(node.children.values())
        return count - len(self._roots)

    # --- scoring -----------------------------------------------------------
    @torch.inference_mode()
    def score(self, adapter: ModelAdapter, columns: RewardColumns, questions: list[EncodedQuestion]):
        with self._lock:
            return self._score(adapter, columns, questions)

    def _score(self, adapter: ModelAdapter, columns: RewardColumns, questions: list[EncodedQuestion]):
        if getattr(adapter, "multimodal_rope", False):
            raise NotImplementedError(
                f"the tree cache keys K/V by token index, but {type(adapter.model).__name__} places tokens with "
                "M-RoPE (positions that depend on the image grid); use engine='fast' or 'reference'"
            )
        owner = (id(adapter.model), columns)
        if owner != self._owner:
            self._roots.clear()
            self.cached_bytes = self.cached_tokens = 0
            self._owner = owner
        self._budget = self.max_batch_tokens or FastEngine.DEFAULT_BUDGET.get(adapter.device.type, 16384)
        tick = next(self._tick)
        call = CallStats()
        self.stats.calls.append(call)
        pending: list[_Node] = []
        # where each candidate ends, and which candidate's embeddings a pending node can take its rows from
        ends: list[list[_Node | None]] = []
        source: dict[int, tuple[int, int]] = {}
        for qi, question in enumerate(questions):
            root = self._root(question)
            ends.append([])
            for ci, cand in enumerate(question.candidates):
                need = cand.reward_positions[-1] + 1 if cand.reward_positions else 0
                call.candidates += 1
                call.requested_tokens += need
                end = self._insert(root, cand.input_ids[:need], tick, pending, source, (qi, ci)) if need else None
                ends[-1].append(end)
        call.computed_tokens = sum(len(n.tokens) for n in pending)
        if pending:
            self._compute(adapter, columns, questions, pending, source, call)
        results = []
        for qi, question in enumerate(questions):
            per_candidate = []
            for ci, cand in enumerate(question.candidates):
                rewards = _rewards_at(ends[qi][ci], cand.reward_positions)
                check_finite(rewards, qi, ci)
                per_candidate.append(rewards.tolist())
            results.append(per_candidate)
        call.evicted_tokens = self._evict()
        return results

    # --- the tree ----------------------------------------------------------
    def _root(self, question: EncodedQuestion) -> _Node:
        key = None if question.image_features is None else _digest(question.image_features)
        if key not in self._roots:
            self._roots[key] = _Node(None, [], 0)
        return self._roots[key]

    def _insert(self, root: _Node, ids: list[int], tick: int, pending: list[_Node],
                source: dict[int, tuple[int, int]], cand: tuple[int, int]) -> _Node:
        """Walk/extend the tree along ids; return the node ending exactly at len(ids)."""
        node, pos = root, 0
        node.last_used = tick
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                new = self._new_pending(node, ids[pos:], pos, pending, source, cand, tick)
                return new
            m = _common(child.tokens, ids, pos)
            if m < len(child.tokens):
                tail = child
                child = self._split(child, m)
                if not child.computed:  # a pending node split by a later candidate of this call
                    pending.append(child)
                    source[id(child)] = source[id(tail)]
            child.last_used = tick
            node, pos = child, pos + m
        return node

    def _new_pending(self, parent: _Node, tokens: list[int], start: int, pending: list[_Node],
                     source: dict[int, tuple[int, int]], cand: tuple[int, int], tick: int) -> _Node:
        """Pending nodes for tokens, chained in chunks of at most max_batch_tokens."""
        node = parent
        for a in range(0, len(tokens), self._budget):
            chunk = list(tokens[a:a + self._budget])
            new = _Node(node, chunk, start + a)
            new.last_used = tick
            node.children[chunk[0]] = new
            pending.append(new)
            source[id(new)] = cand
            node = new
        return node

    def _split(self, node: _Node, m: int) -> _Node:
        """Cut node after its first m tokens; return the head (the tail becomes its only child)."""
        parent = node.parent
        head = _Node(parent, node.tokens[:m], node.start)
        head.last_used = node.last_used
        # only a node below a root is split: it has a parent
        parent.children[head.tokens[0]] = head  # type: ignore[union-attr]
        node.parent = head
        node.tokens = node.tokens[m:]
        node.start += m
        head.children[node.tokens[0]] = node
        if node.computed:
            # computed: K/V and rewards are set
            head.keys = [k[:m].clone() for k in node.keys]  # type: ignore[union-attr]
            head.values = [v[:m].clone() for v in node.values]  # type: ignore[union-attr]
            head.rewards = node.rewards[:m].clone()  # type: ignore[index]
            node.keys = [k[m:].clone() for k in node.keys]  # type: ignore[union-attr]
            node.values = [v[m:].clone() for v in node.values]  # type: ignore[union-attr]
            node.rewards = node.rewards[m:].clone()  # type: ignore[index]
            before = node.nbytes
            head.nbytes, node.nbytes = _nbytes(head), _nbytes(node)
            self.cached_bytes += head.nbytes + node.nbytes - before
        return head

    def _evict(self) -> int:
        """Drop least recently used leaves until the cache fits max_cache_bytes; return tokens evicted."""
        if self.cached_bytes <= self.max_cache_bytes:
            return 0
        heap: list[tuple[int, int, int, _Node]] = []
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node.parent is not None and not node.children:
                heapq.heappush(heap, (node.last_used, node.start, id(node), node))
        evicted = 0
        while heap and self.cached_bytes > self.max_cache_bytes:
            _, _, _, node = heapq.heappop(heap)
            parent = cast(_Node, node.parent)  # the heap holds non-root nodes only
            del parent.children[node.tokens[0]]
            node.parent = None
            self.cached_bytes -= node.nbytes
            self.cached_tokens -= len(node.tokens)
            evicted += len(node.tokens)
            if parent.parent is not None and not parent.children:
                heapq.heappush(heap, (parent.last_used, parent.start, id(parent), parent))
        for key in [k for k, r in self._roots.items() if not r.children]:
            del self._roots[key]
        return evicted

    # --- computing pending nodes -------------------------------------------
    def _compute(self, adapter, columns, questions, pending: list[_Node], source, call: CallStats) -> None:
        decoder = adapter.decoder
        embeds_cache: dict[tuple[int, int], torch.Tensor] = {}
        waiting = set(map(id, pending))
        with shared_prefix_attention_enabled(decoder):
            while waiting:
                # pending nodes are never roots: they have a parent
                wave = [n for n in pending if id(n) in waiting and (n.parent.parent is None or n.parent.computed)]  # type: ignore[union-attr]
                if not wave:
                    raise RuntimeError("tree cache: pending nodes whose parents never get computed (internal error)")
                # Pack whole parents' child sets into forwards of at most max_batch_tokens.
                by_parent: dict[int, list[_Node]] = {}
                for n in wave:
                    by_parent.setdefault(id(n.parent), []).append(n)
                batch: list[list[_Node]] = []
                size = 0
                for children in by_parent.values():
                    for child in children:
                        if batch and size + len(child.tokens) > self._budget:
                            self._forward(adapter, decoder, columns, questions, batch, source, embeds_cache)
                            call.forwards += 1
                            batch, size = [], 0
                        if batch and batch[-1][0].parent is child.parent:
                            batch[-1].append(child)
                        else:
                            batch.append([child])
                        size += len(child.tokens)
                if batch:
                    self._forward(adapter, decoder, columns, questions, batch, source, embeds_cache)
                    call.forwards += 1
                waiting -= set(map(id, wave))

    def _forward(self, adapter, decoder, columns, questions, groups_nodes: list[list[_Node]], source,
                 embeds_cache) -> None:
        device = adapter.device
        ids: list[int] = []
        positions: list[int] = []
        groups: list[Group] = []
        prefixes: list[_PathKV] = []
        segments: list[_Segment] = []
        image_rows: list[tuple[int, torch.Tensor]] = []
        for children in groups_nodes:
            parent = children[0].parent
            path = parent.path()  # type: ignore[union-attr]
            new_tokens = sum(len(c.tokens) for c in children)
            prefix = _PathKV(path, new_tokens)
            # _PathKV serves a group's prefix as PrefixKV does (layer(), length)
            group = Group(len(ids), len(ids), prefix, prefix.length, [0], append=True)  # type: ignore[arg-type]
            for child in children:
                segments.append(_Segment(child, len(groups), len(ids)))
                qi, ci = source[id(child)]
                question = questions[qi]
                if question.image_features is not None:
                    full = embeds_cache.get((qi, ci))
                    if full is None:
                        cand_ids = torch.tensor(question.candidates[ci].input_ids, dtype=torch.long, device=device)
                        full = adapter.merge_image_features(cand_ids, question.image_features)
                        embeds_cache[(qi, ci)] = full
                    image_rows.append((len(ids), full[child.start:child.end]))
                ids.extend(child.tokens)
                positions.extend(range(child.start, child.end))
                group.end = len(ids)
                group.cu_seqlens.append(group.end - group.start)
            groups.append(group)
            prefixes.append(prefix)
        pos = torch.tensor(positions, dtype=torch.long, device=device)[None]
        id_tensor = torch.tensor(ids, dtype=torch.long, device=device)
        if image_rows:
            embeds = adapter.embed(id_tensor)
            for start, rows in image_rows:
                embeds[start:start + rows.shape[0]] = rows
            inputs = {"inputs_embeds": embeds[None]}
        else:
            inputs = {"input_ids": id_tensor[None]}
        out = decoder(**inputs, position_ids=pos, use_cache=False, **{LAYOUT_KWARG: PackedLayout(groups)})
        hidden = out.last_hidden_state[0]
        rewards = adapter.reward_head(columns).rewards(hidden)
        for prefix in prefixes:
            prefix.finish()
        for seg in segments:
            node, group, prefix = seg.node, groups[seg.group], prefixes[seg.group]
            a = seg.row - group.start
            b = a + len(node.tokens)
            node.keys = [k[a:b].clone() for k in prefix.new_keys]
            node.values = [v[a:b].clone() for v in prefix.new_values]
            node.rewards = rewards[seg.row:seg.row + len(node.tokens)].clone()
            node.nbytes = _nbytes(node)
            self.cached_bytes += node.nbytes
            self.cached_tokens += len(node.tokens)


def _common(tokens: list[int], ids: list[int], pos: int) -> int:
    n = min(len(tokens), len(ids) - pos)
    m = 0
    while m < n and tokens[m] == ids[pos + m]:
        m += 1
    return m


def _rewards_at(end: _Node | None, positions: list[int]) -> torch.Tensor:
    """Rewards at absolute positions, read from the path that ends at ``end``."""
    if not positions:
        return torch.empty(0)
    # a candidate's path ends at a node
    chain = end.path()  # type: ignore[union-attr]
    starts = [n.start for n in chain]
    values = []
    for p in positions:
        node = chain[bisect.bisect_right(starts, p) - 1]
        if not node.start <= p < node.end:
            raise RuntimeError(f"tree cache: reward position {p} lies outside the candidate's path (internal error)")
        # the path's nodes are computed: their rewards are set
        values.append(float(node.rewards[p - node.start]))  # type: ignore[index]
    return torch.tensor(values)


def _nbytes(node: _Node) -> int:
    # called on computed nodes: K/V and rewards are set
    total = node.rewards.numel() * node.rewards.element_size()  # type: ignore[union-attr]
    for k, v in zip(node.keys, node.values):  # type: ignore[arg-type]
        total += k.numel() * k.element_size() + v.numel() * v.element_size()
    return total


def _digest(features: torch.Tensor) -> str:
    data = features.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha1(data.numpy().tobytes()).hexdigest() + str(tuple(features.shape))
