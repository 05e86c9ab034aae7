"""Continuous batching: requests that arrive over time, each with its own adapter, prompt and token budget, served
by a fixed number of rows of one KV cache; a finished row takes the next request at once.

A :class:`Server` holds `rows` rows of a :class:`jaxlora.models.kv_cache.KVCache`. The requests that find a free
row at a step are prefilled together (their prompts padded to a length bucket, their number to a power of two)
and each is put into its row (:func:`~jaxlora.models.kv_cache.insert_row`); then one decoding step appends a token
to every busy row, each row through its own adapter slot (an adapter bank's forward, `jaxlora.apply_bank` /
`apply_bank_nnx`). A row that reaches its budget or a stop token is handed back and refilled before the next step,
so no row waits for the longest request of a batch. A bounded set of programs serves every request: one prefill
per (batch size, length bucket) used, one step and an insert per batch size (:attr:`Server.compilations` counts
them); the rows, slots, tokens and the forward's state are traced, and the cache is updated in place (donated).

Each row's positions start at 0 and its attention sees its own slots only, so a request's tokens are the tokens it
gets when run alone with its adapter (merged or not), whatever else shares the batch.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlora import BASE_MODEL
from jaxlora.models import decoding, kv_cache
from jaxlora.models.kv_cache import advance, insert_row
from jaxlora.models.sampling import sample_token

__all__ = ["Completion", "Request", "Server"]

Forward = Callable[[Any, jax.Array, kv_cache.KVCache, jax.Array], tuple[jax.Array, kv_cache.KVCache]]


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request.

    Attributes:
      prompt: its token ids (at least one).
      max_new_tokens: its budget of new tokens (>= 1).
      adapter: the adapter slot it runs on, by name (one of the server's `adapters`) or index; None for the base
        model.
      arrival: the decoding step at which it arrives (0: at once); lets a test or a benchmark replay arrivals
        over time.
      seed: its sampling seed (token i is drawn with ``fold_in(key(seed), i)``, whatever shares the batch); unused
        when the server decodes greedily.
    """

    prompt: Sequence[int]
    max_new_tokens: int
    adapter: str | int | None = None
    arrival: int = 0
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Completion:
    """What became of one request (in the order the requests were given).

    Attributes:
      request: the request.
      tokens: its new tokens, a stop token included (nothing after it); empty if it was refused.
      error: why it was refused (naming the request and the fix), else None.
      admitted: the step at which it got a row (-1 if refused).
      finished: the step after which its last token was known (-1 if refused).
    """

    request: Request
    tokens: tuple[int, ...]
    error: str | None = None
    admitted: int = -1
    finished: int = -1


@dataclasses.dataclass
class _Row:
    index: int
    request: Request
    slot: int
    tokens: list[int]
    admitted: int


class Server:
    """Serves requests with continuous batching over `rows` rows of one KV cache (see the module docstring).

    Args:
      forward: ``forward(state, input_ids (batch, length), kv_cache, adapter_ids (batch,)) -> (logits, kv_cache)``,
        the model call, e.g. ``jaxlora.apply_bank(model, {"params": params}, bank, adapter_ids, input_ids,
        kv_cache=kv_cache)`` with ``state = (params, bank)``; `adapter_ids` are slot indices, -1 for the base.
      state: what `forward` takes first (traced: replacing it, e.g. a bank with a slot hot-swapped, does not
        recompile).
      new_cache: ``new_cache(batch, max_length) -> KVCache``, the model family's ``init_cache`` for its config.
      rows: how many requests decode at once.
      max_length: cache slots per row: a request's prompt plus budget must fit.
      adapters: the slot names `Request.adapter` may use (e.g. ``bank.names``).
      buckets: prompt lengths to pad to (each prompt to the smallest bucket that holds it; one compiled prefill
        per bucket used); default powers of two from 16, and `max_length`.
      eos_token_id: stop token(s), or None.
      temperature, top_k, top_p: sampling settings; `temperature` None decodes greedily.

    Example:
      >>> from jaxlora.models.gpt2 import GPT2, GPT2Config, init_cache
      >>> model = GPT2(GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2))
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
      >>> forward = lambda params, ids, cache, slots: model.apply({"params": params}, ids, kv_cache=cache)
      >>> server = Server(forward, params, lambda b, n: init_cache(model.config, b, n), rows=2, max_length=16)
      >>> done = server.run([Request([1, 2, 3], 4), Request([5], 2), Request([6, 7], 3, arrival=1)])
      >>> [len(c.tokens) for c in done], server.compilations["step"]
      ([4, 2, 3], 1)
    """

    def __init__(
        self,
        forward: Forward,
        state: Any,
        new_cache: Callable[[int, int], kv_cache.KVCache],
        *,
        rows: int,
        max_length: int,
        adapters: Sequence[str] = (),
        buckets: Sequence[int] | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
    ):
        if not isinstance(rows, int) or rows < 1 or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"Server: rows={rows!r} must be >= 1 and max_length={max_length!r} >= 2 (integers).")
        default = [b for b in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if b < max_length] + [max_length]
        buckets = sorted({int(b) for b in (default if buckets is None else buckets)})
        if not buckets or buckets[0] < 1 or buckets[-1] > max_length:
            raise ValueError(f"Server: buckets {buckets} must be prompt lengths in 1..max_length={max_length}.")
        if temperature is not None:
            decoding.check_settings(1, True, temperature, top_k, top_p, vocab_size=2**31 - 1)
        self.forward, self.state, self.new_cache = forward, state, new_cache
        self.rows, self.max_length, self.adapters, self.buckets = rows, max_length, tuple(adapters), tuple(buckets)
        self.eos = decoding.stop_tokens(eos_token_id)
        self._sampling = None if temperature is None else (float(temperature), int(top_k or 0), float(top_p or 1.0))
        self.compilations = {"prefill": 0, "step": 0, "insert": 0}
        self._prefill = jax.jit(self._prefill_fn)
        self._step = jax.jit(self._step_fn, donate_argnums=(1,))  # the cache is updated in place
        self._insert = jax.jit(self._insert_fn, donate_argnums=(0,))

    # --- the three compiled programs -------------------------------------------------------------------------

    def _pick(self, logits: jax.Array, seeds: jax.Array, counts: jax.Array) -> jax.Array:
        """Each row's next token from its logits (batch, vocab): argmax, or drawn with its own key per token."""
        if self._sampling is None:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        temperature, top_k, top_p = self._sampling

        def draw(logits, seed, count):
            key = jax.random.fold_in(jax.random.key(seed), count)
            return sample_token(key, logits, temperature, top_k, top_p)

        return jax.vmap(draw)(logits.astype(jnp.float32), seeds, counts)

    def _prefill_fn(self, state, ids, lengths, slots, seeds):
        self.compilations["prefill"] += 1  # runs once per compilation (a trace)
        logits, cache = self.forward(state, ids, self.new_cache(ids.shape[0], self.max_length), slots)
        last, cache = decoding.prefilled(logits, cache, lengths)
        return self._pick(last[:, 0], seeds, jnp.zeros(ids.shape[:1], jnp.int32)), cache

    def _step_fn(self, state, cache, tokens, slots, busy, seeds, counts):
        self.compilations["step"] += 1
        logits, cache = self.forward(state, tokens[:, None], cache, slots)
        cache = advance(cache, jnp.where(busy, 0, -1))  # an idle row stays where it is
        return self._pick(logits[:, -1], seeds, counts), cache

    def _insert_fn(self, cache, row, prefilled, j):
        """`cache` with row `row` replaced by row `j` of a batch's prefilled cache."""
        self.compilations["insert"] += 1
        one = prefilled.replace(
            keys=lax.dynamic_slice_in_dim(prefilled.keys, j, 1, axis=1),
            values=lax.dynamic_slice_in_dim(prefilled.values, j, 1, axis=1),
            lengths=lax.dynamic_slice_in_dim(prefilled.lengths, j, 1),
        )
        return insert_row(cache, row, one)

    # --- the request loop ------------------------------------------------------------------------------------

    def _refusal(self, i: int, request: Any) -> str | None:
        """Why request `i` cannot be served (naming it and the fix), or None."""
        if not isinstance(request, Request):
            return f"request {i} is a {type(request).__name__}, not a jaxlora.models.continuous_batching.Request"
        prompt = np.asarray(request.prompt)
        if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
            return f"request {i}: the prompt must be a non-empty 1-D sequence of token ids, got shape {prompt.shape}"
        if not isinstance(request.max_new_tokens, int) or request.max_new_tokens < 1:
            return f"request {i}: max_new_tokens={request.max_new_tokens!r} must be an integer >= 1"
        if prompt.size + request.max_new_tokens > self.max_length:
            return (
                f"request {i}: a prompt of {prompt.size} tokens plus {request.max_new_tokens} new tokens does not fit "
                f"the cache's {self.max_length} slots per row; shorten it, lower its max_new_tokens, or build the "
                "Server with a larger max_length"
            )
        slot = request.adapter
        if isinstance(slot, str) and slot not in self.adapters:
            return f"request {i}: no adapter named {slot!r}; the server's adapters are {list(self.adapters)}"
        if slot is not None and not isinstance(slot, str) and not (BASE_MODEL <= slot < len(self.adapters)):
            return (
                f"request {i}: adapter index {slot!r} is out of range for {len(self.adapters)} adapters "
                f"{list(self.adapters)}; use a name, an index, or None for the base model"
            )
        return None

    def _slot(self, request: Request) -> int:
        if request.adapter is None:
            return BASE_MODEL
        return self.adapters.index(request.adapter) if isinstance(request.adapter, str) else int(request.adapter)

    def _bucket(self, length: int) -> int:
        return next((b for b in self.buckets if b >= length), self.max_length)

    def _admit(self, batch: list[_Row]) -> tuple[list[int], kv_cache.KVCache]:
        """Prefills the requests of `batch` together (padded to a power-of-two batch and a length bucket); returns
        their first tokens and the batch's cache (row j holding request j)."""
        n = 1 << (len(batch) - 1).bit_length()
        ids = np.zeros((n, self._bucket(max(len(row.request.prompt) for row in batch))), np.int32)
        lengths, slots, seeds = np.ones(n, np.int32), np.full(n, BASE_MODEL, np.int32), np.zeros(n, np.uint32)
        for j, row in enumerate(batch):
            prompt = np.asarray(row.request.prompt, np.int32)
            ids[j, : prompt.size], lengths[j], slots[j], seeds[j] = prompt, prompt.size, row.slot, row.request.seed
        first, cache = self._prefill(self.state, *map(jnp.asarray, (ids, lengths, slots, seeds)))
        return [int(t) for t in np.asarray(first)[: len(batch)]], cache

    @staticmethod
    def _arrived(requests: Sequence[Request], waiting: collections.deque, clock: int) -> int:
        """How many of the waiting requests (in order of arrival) have arrived by step `clock`."""
        return len(list(itertools.takewhile(lambda i: requests[i].arrival <= clock, waiting)))

    def _finished(self, row: _Row) -> bool:
        return len(row.tokens) >= row.request.max_new_tokens or (bool(self.eos) and row.tokens[-1] in self.eos)

    def run(self, requests: Sequence[Request]) -> list[Completion]:
        """Serves `requests` to the end; a refused request gets its error and the others are served.

        Args:
          requests: the requests; each arrives at its `arrival` step (in order of arrival, then of position).

        Returns:
          One :class:`Completion` per request, in the order given.
        """
        done: dict[int, Completion] = {}
        for i, request in enumerate(requests):
            error = self._refusal(i, request)
            if error is not None:
                done[i] = Completion(request, (), error)
        waiting = collections.deque(
            sorted((i for i in range(len(requests)) if i not in done), key=lambda i: (requests[i].arrival, i))
        )
        rows: list[_Row | None] = [None] * self.rows
        cache = self.new_cache(self.rows, self.max_length)
        clock = 0
        while waiting or any(rows):
            while True:  # every free row takes an arrived request; their prompts are prefilled together
                free = [r for r in range(self.rows) if rows[r] is None]
                arrived = min(len(free), self._arrived(requests, waiting, clock))
                if not arrived:
                    break
                batch = [_Row(i, requests[i], self._slot(requests[i]), [], clock) for i in
                         (waiting.popleft() for _ in range(arrived))]  # fmt: skip
                firsts, prefilled = self._admit(batch)
                for j, (r, row, first) in enumerate(zip(free, batch, firsts, strict=False)):
                    row.tokens.append(first)
                    if self._finished(row):
                        done[row.index] = Completion(row.request, tuple(row.tokens), None, clock, clock)
                    else:
                        cache, rows[r] = self._insert(cache, jnp.int32(r), prefilled, jnp.int32(j)), row
            if not any(rows):
                if waiting:
                    clock = max(clock, requests[waiting[0]].arrival)
                continue
            busy = [row is not None for row in rows]
            tokens, cache = self._step(
                self.state, cache,
                jnp.asarray([row.tokens[-1] if row else 0 for row in rows], jnp.int32),
                jnp.asarray([row.slot if row else BASE_MODEL for row in rows], jnp.int32),
                jnp.asarray(busy), jnp.asarray([row.request.seed if row else 0 for row in rows], jnp.uint32),
                jnp.asarray([len(row.tokens) if row else 0 for row in rows], jnp.int32),
            )  # fmt: skip
            tokens = np.asarray(tokens)
            for r, row in enumerate(rows):
                if row is None:
                    continue
                row.tokens.append(int(tokens[r]))
                if self._finished(row):
                    done[row.index] = Completion(row.request, tuple(row.tokens), None, row.admitted, clock)
                    rows[r] = None
            clock += 1
        return [done[i] for i in range(len(requests))]
