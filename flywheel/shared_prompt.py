"""Attention for samples that share a prompt: each prompt's keys and values are read once for all its samples.

A round draws several samples of every prompt, and the decode loop (``TransformersEngine._decode``) pre-fills each
distinct prompt once. Copying that pre-fill to every sample's row made each decode step read the prompt's keys and
values once per sample; attention is bound by those reads on CPU (about a fifth of a decode step at 128 rows). Here
a batch's cache keeps the prompts' keys and values once (``prompt`` part, prompts x heads x positions) and each row's
own generated tokens apart (``own`` part); a decode step scores the query of every sample of a prompt against the
prompt part in one product, scores each row's own part, and takes one softmax over both (as cascade attention does).
The result is attention over the row's whole sequence, equal to the usual computation up to float rounding.

The model's attention reaches this code through transformers' attention interface: ``enable`` registers
``shared_prompt_attention`` under its own name (sdpa, with sdpa's masks, whenever no shared-prompt cache is
decoding) and switches the model to it.
"""

from __future__ import annotations

import functools

NAME = "flywheel_shared_prompt"


def enable(model) -> bool:
    """Route ``model``'s attention through ``shared_prompt_attention``; False (and nothing changed) when the model
    does not use sdpa, the only implementation this wraps."""
    if model.config._attn_implementation not in ("sdpa", NAME):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, shared_prompt_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the pre-fill and the reference path keep sdpa's masks
    model.set_attn_implementation(NAME)
    return True


def shared_prompt_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-interface signature; ``shared_prompt`` (a ``shared_prompt_cache``) in the model call's
    keyword arguments selects the shared computation for decode steps, anything else is sdpa's."""
    cache = kwargs.pop("shared_prompt", None)
    if cache is None or not cache.sharing or query.shape[2] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return cache.layers[module.layer_idx].attend(query, key, value, scale, cache.grid), None


def shared_prompt_cache(capacity: int):
    """An empty cache for one batch: a ``reserved_cache`` of ``capacity`` positions for the pre-fill of the distinct
    prompts; after ``share`` the pre-fill is the prompt part and new tokens go to each row's own part."""
    cache = _shared_cache_class()()
    layer_class = _shared_layer_class()
    cache.layer_class_to_replicate = lambda: layer_class(capacity)
    return cache


class Grid:
    """Where each cache row sits among its batch's prompts: ``slots[row] = prompt * samples + sample``; ``bias`` is
    the prompts' additive padding mask (prompts x 1 x 1 x positions: 0, or -inf on left padding)."""

    def __init__(self, slots, prompts: int, samples: int, bias):
        self.slots, self.prompts, self.samples, self.bias = slots, prompts, samples, bias
        # One row per slot, in slot order (a batch of whole prompts, before any row leaves): views, no gathers.
        self.dense = len(slots) == prompts * samples and bool((slots == _arange(slots)).all())


def _arange(slots):
    import torch

    return torch.arange(len(slots), device=slots.device)


@functools.cache
def _shared_cache_class():
    import torch
    from transformers import DynamicCache

    class SharedPromptCache(DynamicCache):
        sharing = False
        grid: Grid | None = None

        def share(self, request_of_row: list[int], prompt_mask, reserve: int) -> None:
            """Switch from the pre-fill (one row per distinct request, in order of first appearance) to decoding
            ``request_of_row``'s rows (samples of a request next to each other); ``prompt_mask`` is the pre-fill's
            2-D attention mask; each row's own part has room for ``reserve`` tokens before it grows."""
            order: dict[int, int] = {}
            counts: dict[int, int] = {}
            slots = []
            for request in request_of_row:
                prompt = order.setdefault(request, len(order))
                slots.append((prompt, counts.get(request, 0)))
                counts[request] = counts.get(request, 0) + 1
            samples = max(counts.values())
            device = prompt_mask.device
            index = torch.tensor([p * samples + s for p, s in slots], device=device)
            bias = torch.zeros(prompt_mask.shape, dtype=self.layers[0].keys.dtype, device=device)
            bias = bias.masked_fill(prompt_mask == 0, float("-inf"))[:, None, None, :]
            self.grid = Grid(index, len(order), samples, bias)
            for layer in self.layers:
                layer.share(reserve)
            self.sharing = True

        def keep_rows(self, rows) -> None:
            """Keep the given decode rows (indices into the current rows, ascending); prompts none of them
            sample any more leave the prompt part."""
            grid = self.grid
            slots = grid.slots[rows.to(grid.slots.device)]
            prompts = slots // grid.samples
            live = torch.unique(prompts)  # sorted
            if len(live) < grid.prompts:
                renumber = torch.full((grid.prompts,), -1, dtype=torch.long, device=slots.device)
                renumber[live] = torch.arange(len(live), device=slots.device)
                slots = renumber[prompts] * grid.samples + slots % grid.samples
                for layer in self.layers:
                    layer.keep_prompts(live)
                bias = grid.bias[live]
            else:
                bias = grid.bias
            self.grid = Grid(slots, len(live), grid.samples, bias)
            for layer in self.layers:
                layer.batch_select_indices(rows)

        def unattended(self) -> int:
            """Layers whose new keys and values the last forward pass stored but did not attend with
            ``shared_prompt_attention`` (a model whose attention bypasses transformers' interface)."""
            return sum(layer.pending for layer in self.layers)

    return SharedPromptCache


@functools.cache
def _shared_layer_class():
    import torch

    from flywheel.generation import _reserved_layer_class

    class SharedPromptLayer(_reserved_layer_class()):
        def __init__(self, capacity: int):
            super().__init__(capacity)
            self.prompt_keys = self.prompt_values = None
            self.pending = False

        def share(self, reserve: int) -> None:
            # The pre-fill's filled part becomes the prompt part; own parts start empty and grow per row.
            self.prompt_keys, self.prompt_values = self.keys, self.values
            self.prompt_length = self.length
            self.length, self.key_buffer, self.value_buffer = 0, None, None
            self.capacity = reserve

        def update(self, key_states, value_states, *args, **kwargs):
            self.pending = self.prompt_keys is not None
            return super().update(key_states, value_states, *args, **kwargs)

        def get_seq_length(self) -> int:
            return self.length + (self.prompt_length if self.prompt_keys is not None else 0)

        def keep_prompts(self, prompts) -> None:
            self.prompt_keys = self.prompt_keys.index_select(0, prompts)
            self.prompt_values = self.prompt_values.index_select(0, prompts)

        def attend(self, query, own_keys, own_values, scale: float, grid: Grid):
            """Attention output (rows x 1 x heads x dim) of one decode step: ``query`` is rows x heads x 1 x dim,
            ``own_*`` the rows' own parts (rows x kv heads x tokens x dim, this step's token included)."""
            self.pending = False
            rows, heads, _, dim = query.shape
            kv_heads = own_keys.shape[1]
            group = heads // kv_heads  # query head h reads kv head h // group (transformers' repeat_kv layout)
            prompts, samples, width = grid.prompts, grid.samples, self.prompt_keys.shape[-2]
            query = query.reshape(rows, kv_heads, group, dim)

            def to_grid(per_row, last: int):  # rows x kv x group x last -> prompts x kv x (samples*group) x last
                if grid.dense:
                    full = per_row
                else:
                    full = per_row.new_zeros((prompts * samples, kv_heads, group, last))
                    full.index_copy_(0, grid.slots, per_row)
                return full.view(prompts, samples, kv_heads, group, last).transpose(1, 2).reshape(
                    prompts, kv_heads, samples * group, last)

            def to_rows(per_grid, last: int):  # the inverse of to_grid
                full = per_grid.view(prompts, kv_heads, samples, group, last).transpose(1, 2).reshape(
                    prompts * samples, kv_heads, group, last)
                return full if grid.dense else full.index_select(0, grid.slots)

            prompt_scores = torch.matmul(to_grid(query, dim), self.prompt_keys.transpose(-1, -2))
            prompt_scores = to_rows(prompt_scores.mul_(scale).add_(grid.bias), width)
            own_scores = torch.matmul(query, own_keys.transpose(-1, -2)).mul_(scale)
            top = torch.maximum(prompt_scores.amax(-1, keepdim=True), own_scores.amax(-1, keepdim=True))
            prompt_weights = prompt_scores.sub_(top).exp_()
            own_weights = own_scores.sub_(top).exp_()
            total = prompt_weights.sum(-1, keepdim=True).add_(own_weights.sum(-1, keepdim=True))
            from_prompt = to_rows(torch.matmul(to_grid(prompt_weights, width), self.prompt_values), dim)
            output = torch.matmul(own_weights, own_values).add_(from_prompt).div_(total)
            return output.reshape(rows, 1, heads, dim)

    return SharedPromptLayer
