"""Chapter 4: how much GPU memory one training step of a Llama model needs, and why.

:func:`training_memory` predicts the peak of ``torch.cuda.max_memory_allocated`` during a training step
(forward with labels, backward, gradient clipping, optimizer step) of a Llama-style model trained three
ways: ``"full"`` fine-tuning, ``"lora"`` on a bf16 base, ``"qlora"`` on an NF4 base. Nothing is fitted
to measurements: every byte comes from a tensor that torch, peft or bitsandbytes really allocates, found by
reading their code, and checked on CPU against the real tensors (:mod:`qlora_edu.ch04_memory.memory_probe`) and on an
H100 against ``qlora_edu/reference/gpu-facts.md``.

Notation: ``T = batch * seq`` tokens, ``h`` hidden size, ``i`` MLP size, ``q = heads * head_dim`` (= h in
Llama), ``kv = kv_heads * head_dim`` (< q with grouped-query attention), ``V`` vocabulary, ``L`` layers,
``r`` LoRA rank. Element sizes: ``rd`` of the residual stream (4 with peft's ``prepare_model_for_kbit_training``,
which upcasts the embedding to float32 and so every hidden state; else the weights' 2), ``ad`` of the
adapters (4: peft keeps them in float32), ``cd`` the 4-bit layers' compute dtype (2).

**1. Static memory** (resident from set-up to the end of the step), listed tensor by tensor by
:func:`static_tensors` (the exercise of chapter 4) and summed by :func:`static_parts`.

* Frozen weights. QLoRA: each decoder linear ``n`` weights -> ``n/2`` bytes of packed codes plus its
  constants (double quantization: one uint8 code a block of 64, one float32 a block of 256 codes, a float32
  offset, the 16-value NF4 table): 4.127 bits/param; embeddings, norms and ``lm_head`` unquantized, in
  float32 after ``prepare``. LoRA: everything in bf16. Full: nothing is frozen.
* Trainable weights: LoRA ``A (r x in)`` and ``B (out x r)`` for each targeted projection, ``ad`` bytes each;
  full fine-tuning: every weight (plus a float32 master copy with ``full_precision=torch.float32``).
* Gradients: one per trainable weight, same dtype.
* Optimizer states: AdamW keeps two float32 moments per parameter (8 bytes); bitsandbytes' 8-bit AdamW keeps
  two uint8 codes plus one float32 absmax per 256 values (tensors under 4096 elements stay float32); paged
  optimizers put states of at least 1e5 elements in CUDA unified memory, which ``max_memory_allocated`` does
  not see: they are counted in ``optimizer_states`` and in ``total`` and listed in ``paged_states``, and
  ``torch_peak = total - paged_states`` is what the allocator reports.

**2. Activations: what autograd saves for backward** (per token, per decoder layer, QLoRA recipe).

=========================  =========================================  ==========================
operation                  saved (why)                                bytes / token
=========================  =========================================  ==========================
RMSNorm (x2)               its input cast to float32 (pow and mul need  2 * (4h + 4)
                           it) and ``1/rms``
LoRA on q, k, v, o, gate,  dropout's mask (CUDA: bool; CPU: a float     per module: in * (1 + ad)
up, down                   noise tensor) and its output (lora_A needs   + r * ad
                           it for A's gradient); lora_A's output
                           (lora_B needs it). The 4-bit base saves
                           nothing: ``MatMul4Bit`` keeps only the
                           packed weight (a reference, no copy).
rotary embedding           only ``cos``/``sin``, shared by all layers   (once: 2 * seq * d * rd)
attention (SDPA, fused)    q, k, v after rotary, the output, and the    rd * (2q + 2kv) + 4 heads
                           softmax's log-sum-exp (flash / memory-
                           efficient / cuDNN kernels never store the
                           seq x seq matrix)
SwiGLU                     SiLU's input g, its output and up's output   3 * i * rd
residual adds              nothing                                      0
=========================  =========================================  ==========================

Outside the layers: the final RMSNorm (``4h + 4``), the cross-entropy's log-softmax output (``4V``: the
logits are upcast to float32 first) and the targets. A frozen ``lm_head`` saves nothing (its gradient w.r.t.
the input only needs the weight). Full fine-tuning also saves every linear's input and the norms'
normalized values (the weights' gradients need them). Without checkpointing and without input gradients
(LoRA/QLoRA without checkpointing), layer 0's first RMSNorm and the q/k/v dropout masks are not saved: their
inputs do not require grad.

With **gradient checkpointing** each layer keeps only its input (``h * rd`` per token); during the backward
each layer is run again ("recompute") so that one layer's activations exist at a time.

**3. The peak** is the largest of these moments (each adds to the static memory):

* loss backward: all saved activations plus two more ``T x V`` float32 tensors (the NLL gradient and
  the log-softmax gradient, alive together with the saved log-softmax output: ``12 T V`` bytes in all);
* backward of the last and of the first layer, at its ``down_proj``: the layer's activations (recomputed
  under checkpointing) + the inputs still checkpointed or saved + the gradients so far + the incoming
  gradient ``T h rd`` + the projection's backward temporaries: the LoRA branch (``g * scaling``, the grad of
  the dropout output, the dropout backward) then the base branch (for 4-bit: the gradient cast to bf16, the
  **dequantized weight** ``in x out`` in bf16 that ``MatMul4Bit.backward`` makes, its product) and the sum
  of the two input gradients;
* the same layer's attention backward (after the MLP's tensors were freed), which matters for eager
  attention's ``seq x seq`` matrices;
* the optimizer step: all gradients (+ one state-sized temporary for torch's multi-tensor AdamW,
  ``foreach=True``).

Which checkpointing: peft's ``prepare_model_for_kbit_training`` passes no ``use_reentrant`` and torch
defaults to the reentrant flavour (which also keeps the recomputed layer's output alive during its backward:
counted); transformers' ``gradient_checkpointing_enable()`` asks for ``use_reentrant=False``. Both keep one
input per layer and free recomputed tensors as the backward consumes them.

Settings (keywords of :func:`training_memory`; an unknown one raises ``TypeError``):
``weight_dtype`` (bf16), ``compute_dtype`` (bf16), ``adapter_dtype`` (fp32), ``lora_dropout`` (0.05),
``prepare_kbit`` (True for QLoRA), ``attention`` ("sdpa" or "eager"), ``padded`` (False: see below),
``blocksize`` (64), ``double_quant``
(True), ``full_precision`` (None, or a master-weight dtype for full fine-tuning), ``device`` ("cuda", or
"cpu": the CPU kernels save a float dropout noise instead of a bool mask), ``foreach`` (False),
``input_requires_grad`` / ``reentrant`` (derived as above), ``workspace_bytes`` (0; cuBLAS allocates its
workspace in the torch pool at the first matmul of a process).

The defaults are peft's set-up (float32 adapters, embeddings, norms and head after ``prepare``). The QLoRA
paper's code (``artidoro/qlora``'s ``qlora.py`` with ``--bf16``) casts the adapters to bf16 and the embeddings
and head back to bf16 after ``prepare``: ``prepare_kbit=False, adapter_dtype=torch.bfloat16`` predicts it, up to
its float32 norms (``(2 L + 1) h`` weights, about 1 MiB on 7B).

Not modeled: the allocator's fragmentation (``memory_reserved`` > ``memory_allocated``), the CUDA context
(~0.5 GiB outside torch), a few kernels' internal scratch.

**Padded batches** (``padded=True``: a batch whose attention mask has zeros, as every batch of chapter 8's
fine-tune): transformers hands SDPA an explicit mask, which changes what attention saves. It repeats k and v
to every query head (grouped-query attention in SDPA needs ``attention_mask is None``), so k and v are saved
at ``q`` columns instead of ``kv``, and SDPA converts the boolean mask into an additive one in the query's
dtype, which every layer saves: ``b * s * s * rd`` (CUDA: the columns padded to a multiple of 8). For the
course model that is ``2 * (q - kv) + s`` = 889 elements a token a layer at ``s`` = 121: the gap chapter 9's
lab 8 found before this term existed (2.7-7.0% of the saved bytes without checkpointing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from qlora_edu.ch03_double_quant.storage import LLAMA_SHAPES
from qlora_edu.ch04_memory.guards import (
    LlamaDims,
    check_fits_args,
    check_largest_batch_size_args,
    check_largest_model_args,
    check_largest_seq_len_args,
    check_llama_config_args,
    check_sharding_args,
    check_static_parts_args,
    check_static_tensors_args,
    check_training_memory_args,
)
from qlora_edu.common.names import LLAMA_TARGETS

__all__ = [
    "COURSE_MODEL_SHAPE",
    "DQ_BLOCK",
    "MIN_8BIT_NUMEL",
    "MemoryBreakdown",
    "PAGED_MIN_NUMEL",
    "STATE_BLOCK",
    "StaticTensor",
    "fits",
    "largest_batch_size",
    "largest_model",
    "largest_seq_len",
    "llama_config",
    "static_parts",
    "static_tensors",
    "training_memory",
]

MiB = 2**20
GiB = 2**30

#: The course model (SmolLM2-135M-Instruct), in the one place its shape is written down; a test checks it
#: against the converted model's config.json and the loaded model.
COURSE_MODEL_SHAPE: dict[str, object] = {
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True,
}

PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages a state only from 1e5 elements (get_state_buffer)
MIN_8BIT_NUMEL = 4096      # ... and keeps tensors under 4096 elements in float32 states (min_8bit_size)
STATE_BLOCK = 256          # 8-bit optimizer states: one float32 absmax per 256 values
DQ_BLOCK = 256             # double quantization: one float32 absmax per 256 8-bit constants
CUDA_ROUND = 512           # the CUDA caching allocator hands out multiples of 512 bytes


# ----------------------------------------------------------------------------------------------
# Shapes and the resolved recipe


@dataclass(frozen=True)
class _Recipe:
    """Everything one prediction depends on, resolved to element sizes in bytes."""

    method: str
    batch: int
    seq: int
    r: int
    targets: tuple[str, ...]
    ckpt: bool
    optimizer: str
    wd: int          # unquantized weights as built
    base_wd: int     # frozen unquantized weights after prepare (4 with prepare_kbit)
    cd: int          # 4-bit compute dtype
    ad: int          # adapters
    rd: int          # residual stream / activations (the embedding's dtype)
    hd: int          # logits (lm_head's dtype)
    dropout: float
    attention: str   # the kernel that runs: "fused", "math" or "eager"
    padded: bool     # an explicit attention mask (a padded batch) reaches SDPA
    blocksize: int
    double_quant: bool
    cuda: bool
    foreach: bool
    input_grad: bool
    reentrant: bool
    workspace: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def mask_bytes(self) -> int:
        """Bytes per element of what dropout saves: CUDA's fused kernel a bool mask, the CPU path a
        float noise tensor in the dropout input's dtype (the adapters')."""
        return 1 if self.cuda else self.ad

    def alloc(self, nbytes: int) -> int:
        """Bytes the allocator really hands out for one tensor of ``nbytes``."""
        if self.cuda and nbytes:
            return -(-nbytes // CUDA_ROUND) * CUDA_ROUND
        return nbytes


def _attention_kernel(attention: str, cuda: bool, rd: int, gqa: bool, padded: bool) -> str:
    """Which attention code runs. SDPA on CUDA: flash / cuDNN for 16-bit inputs, the memory-efficient
    kernel for float32, but that kernel has no grouped-query support (torch's sdp_utils), so float32 with
    GQA falls back to the math path, which materializes the seq x seq matrix. The CPU flash kernel takes
    both dtypes and GQA. A padded batch (``padded``) gives SDPA an explicit mask: transformers then repeats
    k and v to every query head itself (``use_gqa_in_sdpa`` is False with a mask), so CUDA runs the
    memory-efficient kernel (flash takes no mask) in either dtype."""
    if attention == "eager":
        return "eager"
    if cuda and rd == 4 and gqa and not padded:
        return "math"
    return "fused"


def _mask_columns(rc: _Recipe) -> int:
    """Columns of the additive mask SDPA keeps per layer for a padded batch: ``seq`` on the CPU; on CUDA the
    memory-efficient kernel wants its bias's rows aligned, and PyTorch pads them to a multiple of 8 (its
    ``preprocess_mask``; not yet measured on a GPU by this course)."""
    return -(-rc.seq // 8) * 8 if rc.cuda else rc.seq


def _recipe(shape: LlamaDims, method: str, batch: int, seq: int, r: int, targets: tuple[str, ...], ckpt: bool,
            optimizer: str, s: dict) -> _Recipe:
    size = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
    wd = size[s["weight_dtype"]]
    prepare = s["prepare_kbit"]
    base_wd = 4 if prepare else wd  # prepare upcasts every non-4-bit weight to float32
    rd = base_wd if method != "full" else wd
    return _Recipe(method=method, batch=batch, seq=seq, r=r, targets=targets, ckpt=ckpt, optimizer=optimizer,
                   wd=wd, base_wd=base_wd, cd=size[s["compute_dtype"]], ad=size[s["adapter_dtype"]], rd=rd,
                   hd=rd,
                   dropout=float(s["lora_dropout"]),
                   attention=_attention_kernel(s["attention"], s["device"] == "cuda", rd,
                                               shape.kv_heads != shape.heads, s["padded"]),
                   padded=s["padded"],
                   blocksize=s["blocksize"], double_quant=s["double_quant"], cuda=s["device"] == "cuda",
                   foreach=s["foreach"], input_grad=s["input_requires_grad"], reentrant=s["reentrant"] and ckpt,
                   workspace=s["workspace_bytes"])


# ----------------------------------------------------------------------------------------------
# Static memory: weights, gradients, optimizer states


@dataclass(frozen=True)
class StaticTensor:
    """One tensor that lives from the set-up to the end of a training step.

    Attributes:
        part: ``"frozen_weights"``, ``"trainable_weights"``, ``"gradients"`` or ``"optimizer_states"``.
        module: the module it belongs to (``"q_proj"``, ``"input_layernorm"``, ``"embed_tokens"``, ``"norm"``,
            ``"lm_head"``, ``"rotary_emb"``).
        layer: its decoder layer (``None`` outside the layers).
        what: which tensor of the module (``"weight"``, ``"lora_A"``, ``"absmax codes"``, ``"exp_avg"``, ...).
        nbytes: its bytes (``numel * element size``; the allocator may round it up).
        paged: an optimizer state that a paged optimizer keeps in CUDA unified memory.
    """

    part: str
    module: str
    layer: int | None
    what: str
    nbytes: int
    paged: bool = False


def static_tensors(config, method: str, *, lora_r: int = 64, lora_targets=LLAMA_TARGETS, optimizer: str = "adamw",
                   **settings) -> list[StaticTensor]:
    """Every tensor that is resident for the whole training step: frozen weights with their quantization
    constants, trainable weights, their gradients and the optimizer's states, one :class:`StaticTensor` each.

    For a projection of ``n = in * out`` weights (``r`` the LoRA rank, element sizes in bytes):

    * QLoRA's frozen base (bitsandbytes ``Params4bit``, NF4): ``ceil(n / 2)`` packed codes (uint8) and a quant
      state with its own copy of the 16-value NF4 table (float32); with double quantization one uint8 code
      per block of 64 weights, one float32 ``absmax2`` per 256 codes, a float32 offset and its own copy of the
      256-value dynamic map (float32); without it one float32 absmax per block;
    * LoRA's frozen base: ``n`` weights in the base dtype; every other frozen weight (embeddings, norms,
      ``lm_head``) in the base dtype, float32 after peft's ``prepare_model_for_kbit_training``;
    * adapters ``A (r x in)`` and ``B (out x r)`` in the adapter dtype (float32: peft's default);
    * each trainable tensor of ``m`` elements has a gradient of its own dtype and AdamW's two float32 moments
      (``8 m`` bytes); bitsandbytes' 8-bit AdamW: two uint8 states + two float32 absmax per 256 values (for
      ``m >= 4096``; smaller tensors keep float32 states; one pair of 256-value maps for all); paged
      optimizers keep states of ``m >= 1e5`` elements in unified memory (on CUDA).

    Args:
        config, method, lora_r, lora_targets, optimizer, **settings: as for :func:`training_memory`.

    Returns:
        the list of :class:`StaticTensor`; :func:`static_parts` sums it by part.
    """
    dims, targets, s = check_static_tensors_args(config, method, lora_r, lora_targets, optimizer, settings)
    wd, ad = s["weight_dtype"].itemsize, s["adapter_dtype"].itemsize
    base = 4 if s["prepare_kbit"] else wd  # prepare upcasts every frozen 16-bit weight to float32
    h, V, r = dims.hidden, dims.vocab, lora_r
    paging = optimizer.startswith("paged") and s["device"] == "cuda"
    out: list[StaticTensor] = []

    def frozen(module: str, layer: int | None, what: str, nbytes: int) -> None:
        out.append(StaticTensor("frozen_weights", module, layer, what, nbytes))

    def trainable(module: str, layer: int | None, what: str, numel: int, size: int) -> None:
        """A trainable tensor of ``numel`` elements of ``size`` bytes, its gradient and optimizer states."""
        out.append(StaticTensor("trainable_weights", module, layer, what, numel * size))
        if s["full_precision"] is not None:  # a master copy of every trained weight
            out.append(StaticTensor("trainable_weights", module, layer, f"{what} (master copy)",
                                    numel * s["full_precision"].itemsize))
        out.append(StaticTensor("gradients", module, layer, f"{what}.grad", numel * size))
        paged = paging and numel >= PAGED_MIN_NUMEL  # bitsandbytes pages states of >= 1e5 elements
        if optimizer == "sgd":
            return
        if optimizer.endswith("8bit") and numel >= MIN_8BIT_NUMEL:
            if not any(t.module == "optimizer" for t in out):  # the two 256-value maps, shared by all states
                for qmap in ("qmap1", "qmap2"):
                    out.append(StaticTensor("optimizer_states", "optimizer", None, f"{qmap} (shared)", 256 * 4))
            for state in ("state1", "state2"):
                out.append(StaticTensor("optimizer_states", module, layer, f"{what} {state} (uint8)", numel, paged))
            for absmax in ("absmax1", "absmax2"):
                out.append(StaticTensor("optimizer_states", module, layer, f"{what} {absmax}",
                                        4 * -(-numel // STATE_BLOCK)))
        else:
            for state in ("exp_avg", "exp_avg_sq"):
                out.append(StaticTensor("optimizer_states", module, layer, f"{what} {state}", 4 * numel, paged))

    # the rotary embedding's two float32 buffers (inv_freq and original_inv_freq), never trained
    for what in ("inv_freq", "original_inv_freq"):
        frozen("rotary_emb", None, what, 4 * (dims.head_dim // 2))
    if method == "full":  # every weight is trained, in the dtype it was built in
        trainable("embed_tokens", None, "weight", V * h, wd)
        for layer in range(dims.layers):
            for name, (n_in, n_out) in dims.linears().items():
                trainable(name, layer, "weight", n_in * n_out, wd)
            for name in ("input_layernorm", "post_attention_layernorm"):
                trainable(name, layer, "weight", h, wd)
        trainable("norm", None, "weight", h, wd)
        if not dims.tied:  # tied: lm_head *is* the embedding
            trainable("lm_head", None, "weight", V * h, wd)
        return out
    # BEGIN SOLUTION
    # Hint: for each layer and each of its seven projections (dims.linears(): name -> (in, out)):
    # Hint:   the frozen base weight: qlora -> NF4: ceil(n/2) packed bytes, 16 * 4 (the NF4 table), and with
    # Hint:   s["double_quant"] ceil(n/blocksize) uint8 codes, 4 * ceil(codes/256), 4 (offset), 256 * 4 (the
    # Hint:   dynamic map); without it 4 * ceil(n/blocksize); lora -> n * base bytes;
    # Hint:   and if the projection is in `targets`: trainable lora_A (r * in) and lora_B (out * r), `ad` bytes each.
    # Hint: each layer's two RMSNorm weights (h * base); outside the layers: embed_tokens (V * h * base), the
    # Hint: final norm (h * base), and lm_head (V * h * base) unless dims.tied.
    blocksize = s["blocksize"]
    for layer in range(dims.layers):
        for name, (n_in, n_out) in dims.linears().items():
            n = n_in * n_out
            if method == "qlora":  # what bitsandbytes' Params4bit and its QuantState hold
                frozen(name, layer, "packed NF4 codes", -(-n // 2))
                frozen(name, layer, "NF4 table", 16 * 4)
                blocks = -(-n // blocksize)
                if s["double_quant"]:
                    frozen(name, layer, "absmax codes (uint8)", blocks)
                    frozen(name, layer, "absmax2 (float32)", 4 * -(-blocks // DQ_BLOCK))
                    frozen(name, layer, "offset", 4)
                    frozen(name, layer, "dynamic map", 256 * 4)
                else:
                    frozen(name, layer, "absmax (float32)", 4 * blocks)
            else:
                frozen(name, layer, "weight", n * base)
            if name in targets:
                trainable(name, layer, "lora_A", r * n_in, ad)
                trainable(name, layer, "lora_B", n_out * r, ad)
        for name in ("input_layernorm", "post_attention_layernorm"):
            frozen(name, layer, "weight", h * base)
    frozen("embed_tokens", None, "weight", V * h * base)
    frozen("norm", None, "weight", h * base)
    if not dims.tied:
        frozen("lm_head", None, "weight", V * h * base)
    # END SOLUTION
    return out


def static_parts(tensors) -> dict[str, int]:
    """Bytes of each part of a :func:`static_tensors` list: ``{"frozen_weights", "trainable_weights",
    "gradients", "optimizer_states"}`` (exact tensor bytes; no allocator rounding)."""
    tensors = check_static_parts_args(tensors)
    parts = dict.fromkeys(("frozen_weights", "trainable_weights", "gradients", "optimizer_states"), 0)
    for t in tensors:
        parts[t.part] += t.nbytes
    return parts


# ----------------------------------------------------------------------------------------------
# Activations: what one decoder layer saves for backward


@dataclass(frozen=True)
class _Saved:
    """One saved tensor of a layer. ``stage`` is the part of the layer's backward that frees it, in the
    order autograd runs them: down, swiglu, up, gate, norm2, o, attn (the rest of the attention half)."""

    name: str
    nbytes: int
    stage: str


#: The stages of a decoder layer's backward, in the order autograd runs them (it prefers the nodes
#: created last: the MLP before the attention, ``up_proj`` before ``SiLU`` and ``gate_proj``).
STAGES = ("down", "swiglu", "up", "gate", "norm2", "o", "attn")


def _lora_saved(rc: _Recipe, name: str, n_in: int, input_grad: bool, stage: str) -> list[_Saved]:
    """What peft's ``lora_B(lora_A(dropout(x.to(ad)))) * scaling`` saves for one projection."""
    T, ad = rc.tokens, rc.ad
    out = []
    if rc.dropout > 0:
        if input_grad:  # dropout's mask is only kept when its input needs a gradient
            out.append(_Saved(f"{name}: dropout mask", T * n_in * rc.mask_bytes, stage))
        out.append(_Saved(f"{name}: dropout output (lora_A's input)", T * n_in * ad, stage))
    elif rc.rd != ad:
        out.append(_Saved(f"{name}: input cast to the adapter dtype", T * n_in * ad, stage))
    out.append(_Saved(f"{name}: lora_A output", T * rc.r * ad, stage))
    return out


def _shares_input(rc: _Recipe, names: tuple[str, ...]) -> bool:
    """Does some consumer save this projection input itself (not a copy)? Full fine-tuning's linears do
    (for the weight's gradient); so does lora_A when there is no dropout and no dtype cast."""
    if rc.method == "full":
        return True
    return any(n in rc.targets for n in names) and rc.dropout == 0 and rc.rd == rc.ad


def _layer_saved(shape: LlamaDims, rc: _Recipe, first: bool) -> list[_Saved]:
    """The tensors one decoder layer saves for backward (``first``: layer 0, whose input may not require
    grad). Sizes in bytes, before allocator rounding."""
    T, b, s = rc.tokens, rc.batch, rc.seq
    h, i, q, kv, nh = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim, shape.heads
    rd, full = rc.rd, rc.method == "full"
    input_grad = rc.input_grad or not first
    saved: list[_Saved] = []

    def norm(name: str, stage: str, grad: bool) -> None:
        if not grad:
            return  # nothing in RMSNorm needs a gradient: no graph is recorded
        saved.append(_Saved(f"{name}: input in float32", T * h * 4, stage))
        saved.append(_Saved(f"{name}: 1/rms", T * 4, stage))
        if full:  # weight * normalized: the weight's gradient needs the normalized values
            saved.append(_Saved(f"{name}: normalized", T * h * rd, stage))

    def lora(name: str, grad: bool, stage: str) -> None:
        if rc.method != "full" and name in rc.targets:
            saved.extend(_lora_saved(rc, name, shape.linears()[name][0], grad, stage))

    # attention half
    norm("input_layernorm", "attn", input_grad)
    if _shares_input(rc, ("q_proj", "k_proj", "v_proj")):
        saved.append(_Saved("q/k/v input (RMSNorm output)", T * h * rd, "attn"))
    for name in ("q_proj", "k_proj", "v_proj"):
        lora(name, input_grad, "attn")
    S2 = b * nh * s * s
    if rc.attention == "fused":
        mem_efficient = rc.cuda and (rd == 4 or rc.padded)
        lse_len = -(-s // 32) * 32 if mem_efficient else s  # the memory-efficient kernel pads to 32
        # a padded batch: transformers repeats k and v to every query head (no enable_gqa with a mask), and
        # SDPA turns the boolean mask into an additive one in the query's dtype, saved by every layer
        kv_saved = q if rc.padded else kv
        rep = " (repeated for GQA: padded batch)" if rc.padded and kv != q else ""
        saved += [_Saved("attention: q after rotary", T * q * rd, "attn"),
                  _Saved("attention: k after rotary" + rep, T * kv_saved * rd, "attn"),
                  _Saved("attention: v" + rep, T * kv_saved * rd, "attn"),
                  _Saved("attention: output", T * q * rd, "attn"),
                  _Saved("attention: log-sum-exp (float32)", b * nh * lse_len * 4, "attn")]
        if rc.padded:
            saved.append(_Saved("attention: additive mask (padded batch)", b * s * _mask_columns(rc) * rd, "attn"))
    else:
        gqa = kv != q
        k_saved = q if (gqa or rc.attention == "math") else kv
        saved += [_Saved("attention: q", T * q * rd, "attn"),
                  _Saved("attention: k" + (" (repeated for GQA)" if gqa else ""), T * k_saved * rd, "attn"),
                  _Saved("attention: v" + (" (repeated for GQA)" if gqa else ""), T * k_saved * rd, "attn")]
        if rc.attention == "eager":  # softmax in float32, then cast back for the product with v
            saved.append(_Saved("attention: softmax (float32, seq x seq)", S2 * 4, "attn"))
            if rd != 4:
                saved.append(_Saved("attention: softmax cast (seq x seq)", S2 * rd, "attn"))
        else:
            saved.append(_Saved("attention: softmax (seq x seq)", S2 * rd, "attn"))
    if _shares_input(rc, ("o_proj",)) and rc.attention != "fused":
        # fused kernels write their output in (batch, seq, heads, dim) order: o_proj reads it without a copy
        saved.append(_Saved("o_proj input (contiguous copy)", T * q * rd, "o"))
    lora("o_proj", True, "o")
    # MLP half
    norm("post_attention_layernorm", "norm2", True)
    if _shares_input(rc, ("gate_proj", "up_proj")):  # freed with its last user in the backward: gate_proj
        saved.append(_Saved("gate/up input (RMSNorm output)", T * h * rd, "gate"))
    lora("gate_proj", True, "gate")
    lora("up_proj", True, "up")
    saved += [_Saved("SiLU input (gate output)", T * i * rd, "swiglu"),
              _Saved("SiLU output", T * i * rd, "swiglu"),
              _Saved("up output", T * i * rd, "swiglu")]
    if _shares_input(rc, ("down_proj",)):
        saved.append(_Saved("down input (SiLU x up)", T * i * rd, "down"))
    lora("down_proj", True, "down")
    return saved


def _outside_saved(shape: LlamaDims, rc: _Recipe) -> list[_Saved]:
    """Saved tensors after the last layer: final norm and lm_head (stage "head"), loss (stage "loss")."""
    T, h, V = rc.tokens, shape.hidden, shape.vocab
    out = [_Saved("final norm: input in float32", T * h * 4, "head"), _Saved("final norm: 1/rms", T * 4, "head")]
    if rc.method == "full":
        out += [_Saved("final norm: normalized", T * h * rc.rd, "head"),
                _Saved("lm_head input", T * h * rc.rd, "head")]
    out += [_Saved("cross-entropy: log-softmax output (float32)", T * V * 4, "loss"),
            _Saved("cross-entropy: targets", T * 8, "loss"), _Saved("cross-entropy: total weight", 4, "loss")]
    return out


def _model_saved(shape: LlamaDims, rc: _Recipe) -> list[_Saved]:
    """Saved tensors made before the layers: embedding indices (trainable embedding), rotary cos/sin
    (saved by the rotary multiplications; under checkpointing only the checkpoints hold them)."""
    out = []
    if rc.method == "full":
        out.append(_Saved("embedding: token ids", rc.tokens * 8, "embed"))
    if not rc.ckpt:
        out += [_Saved("rotary cos", rc.seq * shape.head_dim * rc.rd, "embed"),
                _Saved("rotary sin", rc.seq * shape.head_dim * rc.rd, "embed")]
    return out


# ----------------------------------------------------------------------------------------------
# Temporaries of the forward and backward operations


def _linear_backward(rc: _Recipe, shape: LlamaDims, name: str, owns_input: bool) -> tuple[int, int]:
    """The peak of one projection's backward as ``(its saved tensors still alive, temporaries)``, beyond
    its incoming gradient. Autograd runs the LoRA branch first (its nodes were created last) and frees
    each node's saved tensors when the node is done; then the base branch, whose input gradient it adds
    in place into the LoRA branch's. ``owns_input``: the projection is the last user of a saved shared
    input (freed after it)."""
    T, r, rd, ad, cd = rc.tokens, rc.r, rc.rd, rc.ad, rc.cd
    n_in, n_out = shape.linears()[name]
    lora = rc.method != "full" and name in rc.targets
    a = rc.alloc
    # this projection's saved tensors (as in _lora_saved / _shares_input)
    mask = a(T * n_in * rc.mask_bytes) if lora and rc.dropout > 0 else 0
    dropped = a(T * n_in * ad) if lora and (rc.dropout > 0 or rd != ad) else 0
    shared = a(T * n_in * rd) if owns_input and _shares_input(rc, (name,)) else 0
    a_out = a(T * r * ad) if lora else 0
    full_x = shared if rc.method == "full" else 0  # kept until the weight's gradient is computed
    phases = []
    held = 0
    if lora:
        g_cast = a(T * n_out * ad) if rd != ad else 0      # the gradient cast to the adapter dtype
        scaled = a(T * n_out * ad)                         # ... times the LoRA scaling
        grad_drop = a(T * n_in * ad)                       # lora_A's input gradient
        drop_bwd = a(T * n_in * ad) if rc.dropout > 0 else 0  # dropout backward: grad * mask / (1 - p)
        cast_back = a(T * n_in * rd) if rd != ad else 0    # back to the residual dtype
        phases += [(mask + dropped + shared + a_out, g_cast + scaled),          # g * scaling
                   (mask + dropped + shared, a(T * r * ad) + grad_drop),       # lora_A backward
                   (mask + full_x, grad_drop + drop_bwd),                      # dropout backward
                   (full_x, (drop_bwd or grad_drop) + cast_back)]              # cast back
        held = a(T * n_in * rd)                            # waits for the base branch's gradient
    if rc.method == "qlora":
        # Linear4bit: x.to(cd) -> MatMul4Bit -> .to(rd); MatMul4Bit.backward dequantizes the whole weight
        g_cd = a(T * n_out * cd) if rd != cd else 0
        absmax = a(4 * -(-n_in * n_out // rc.blocksize)) if rc.double_quant else 0
        weight = a(n_in * n_out * cd) + absmax
        grad_cd = a(T * n_in * cd)
        back = a(T * n_in * rd) if rd != cd else 0
        phases += [(0, held + g_cd + weight + grad_cd), (0, held + grad_cd + back)]
    else:
        phases.append((full_x, held + a(T * n_in * rc.rd)))  # grad_x = g @ W (W's gradient counted apart)
    # the two branch gradients are then summed in place (autograd reuses the first one's buffer)
    return max(phases, key=sum)


def _linear_forward(rc: _Recipe, shape: LlamaDims, name: str) -> tuple[int, int]:
    """The peak of one projection's forward as ``(its saved tensors alive, temporaries)``, its input not
    included. It matters under checkpointing: the layer is re-run in the backward while the gradients of
    the later layers exist. The 4-bit base (bitsandbytes' CUDA fallback path, and its CPU op) dequantizes
    the weight for ``F.linear``; peft keeps ``x`` cast to the adapter dtype in a local variable until its
    forward returns, next to the base ``result``."""
    T, r, rd, ad, cd, wd = rc.tokens, rc.r, rc.rd, rc.ad, rc.cd, rc.wd
    n_in, n_out = shape.linears()[name]
    lora = rc.method != "full" and name in rc.targets
    a = rc.alloc
    mask = a(T * n_in * rc.mask_bytes) if lora and rc.dropout > 0 else 0
    dropped = a(T * n_in * ad) if lora and (rc.dropout > 0 or rd != ad) else 0
    a_out = a(T * r * ad) if lora else 0
    phases = []
    if rc.method == "qlora":
        x_cd = a(T * n_in * cd) if rd != cd else 0
        weight = a(n_in * n_out * cd) + (a(4 * -(-n_in * n_out // rc.blocksize)) if rc.double_quant else 0)
        out_cd = a(T * n_out * cd)
        phases += [(0, x_cd + weight + out_cd), (0, out_cd + a(T * n_out * rd))]
        result = a(T * n_out * rd)
        phases.append((0, 2 * result))  # peft's defensive result.clone()
    else:
        result = a(T * n_out * wd)
        phases.append((0, result))
    if lora:
        x_ad = dropped if (rc.dropout == 0 and rd != ad) else (a(T * n_in * ad) if rd != ad else 0)
        lora_out = a(T * n_out * ad)
        phases += [(mask + dropped, result + x_ad),                                  # dropout
                   (mask + dropped + a_out, result + x_ad + 2 * lora_out),           # lora_B(...) * scaling
                   (mask + dropped + a_out, x_ad + 3 * a(T * n_out * max(rd, ad)))]  # cast and add
    return max(phases, key=sum)


def _attention_backward_extra(rc: _Recipe, shape: LlamaDims) -> int:
    """Temporaries of the attention core's backward: the output gradient, dq/dk/dv, and for the fused CUDA
    kernels a float32 dq accumulator; eager/math attention adds gradients of the seq x seq matrices."""
    T, rd, q, kv, a = rc.tokens, rc.rd, shape.q_dim, shape.kv_dim, rc.alloc
    kv = q if rc.padded and rc.attention == "fused" else kv  # k and v were repeated to every head
    grads = a(T * q * rd) + a(T * q * rd) + 2 * a(T * kv * rd)
    if rc.attention == "fused":
        return grads + (a(T * q * 4) if rc.cuda else 0)
    S2 = rc.batch * shape.heads * rc.seq * rc.seq
    return grads + max(a(S2 * rd) + a(S2 * 4), 2 * a(S2 * 4))


def _norm_backward_extra(rc: _Recipe, shape: LlamaDims) -> int:
    """Temporaries of RMSNorm's backward (float32, ``T x h`` each): the gradient through ``x * rsqrt``,
    mean's expanded gradient, and pow's ``2 * x * grad`` (``x.pow(1)`` and two products): four at once."""
    return 4 * rc.alloc(rc.tokens * shape.hidden * 4)


def _layer_stages(rc: _Recipe, shape: LlamaDims, items: list[_Saved]) -> list[tuple[str, int, int, tuple[str, ...]]]:
    """The moments of one layer's backward as ``(name, its saved bytes alive, temporaries, modules whose
    gradients exist)``; the incoming gradient ``T h rd`` is added by the caller."""
    T, i, h, rd, a = rc.tokens, shape.intermediate, shape.hidden, rc.rd, rc.alloc

    def alive(freed: tuple[str, ...]) -> int:
        return sum(a(x.nbytes) for x in items if x.stage not in freed)

    down_alive, down_temp = _linear_backward(rc, shape, "down_proj", owns_input=True)
    up_alive, up_temp = _linear_backward(rc, shape, "up_proj", owns_input=False)
    gate_alive, gate_temp = _linear_backward(rc, shape, "gate_proj", owns_input=True)
    mlp = ("down_proj", "up_proj", "gate_proj")
    return [
        ("down_proj", alive(("down",)) + down_alive, down_temp, ("down_proj",)),
        # SwiGLU: mul's backward makes the gradients of SiLU's output and of up's output from down's
        ("SwiGLU", alive(("down",)), 3 * a(T * i * rd), ("down_proj",)),
        ("up_proj", alive(("down", "swiglu", "up")) + up_alive, a(T * i * rd) + up_temp,
         ("down_proj", "up_proj")),
        ("gate_proj", alive(("down", "swiglu", "up", "gate")) + gate_alive, a(T * h * rd) + gate_temp, mlp),
        ("post_attention_layernorm", alive(("down", "swiglu", "up", "gate")), a(T * h * rd)
         + _norm_backward_extra(rc, shape), mlp + ("post_attention_layernorm",)),
        ("attention", alive(("down", "swiglu", "up", "gate", "norm2", "o")), _attention_backward_extra(rc, shape),
         mlp + ("post_attention_layernorm", "o_proj")),
    ]


# ----------------------------------------------------------------------------------------------
# The breakdown


@dataclass(frozen=True)
class MemoryBreakdown:
    """Predicted memory of one training step, in bytes.

    The **parts** (:attr:`parts`, in stacking order) are what is resident at the step's peak and add up to
    :attr:`total`:

    Attributes:
        frozen_weights: frozen base weights with their quantization constants.
        trainable_weights: adapters (LoRA/QLoRA) or every weight (full, with its master copy if any).
        optimizer_states: all optimizer states (paged ones too: see ``paged_states``).
        gradients: gradients that exist at the peak (at the first layer's backward: nearly all).
        activations: saved-for-backward tensors still alive at the peak (checkpointed layer inputs, or
            the saved tensors of the layers not yet back-propagated).
        recompute: the layer re-run by gradient checkpointing, alive at the peak (0 without checkpointing).
        logits: logit-sized buffers beyond the saved log-softmax (the cross-entropy's gradients) at the peak.
        working_set: temporaries of the operation running at the peak (incoming gradient, dequantized
            4-bit weight, branch gradients, inputs held by the forward).
        workspace: CUDA libraries' scratch in the torch pool (``workspace_bytes`` setting).
        total: the peak: everything resident, optimizer states included (what gpu-facts.md calls total).
        paged_states: the part of ``optimizer_states`` in CUDA unified memory (paged optimizers).
        saved_activations: everything autograd saves for backward by the end of the forward.
        all_gradients: all gradients after the backward.
        peak_phase: which moment of the step is the peak.
        layer_saved: ``(name, bytes)`` of what one decoder layer saves (a layer after the first).
    """

    frozen_weights: int
    trainable_weights: int
    optimizer_states: int
    gradients: int
    activations: int
    recompute: int
    logits: int
    working_set: int
    workspace: int
    total: int
    paged_states: int
    saved_activations: int
    all_gradients: int
    peak_phase: str
    layer_saved: tuple[tuple[str, int], ...] = field(default=(), repr=False)

    parts = ("frozen_weights", "trainable_weights", "optimizer_states", "gradients", "activations", "recompute",
             "logits", "working_set", "workspace")

    @property
    def torch_peak(self) -> int:
        """What ``torch.cuda.max_memory_allocated`` reports: ``total`` minus the paged optimizer states."""
        return self.total - self.paged_states

    def as_dict(self) -> dict[str, object]:
        """All fields (and ``torch_peak``) as a plain dict."""
        d = asdict(self)
        d["layer_saved"] = list(self.layer_saved)
        d["torch_peak"] = self.torch_peak
        return d

    def __str__(self) -> str:
        def fmt(n: int) -> str:
            return f"{n / GiB:9.2f} GiB" if n >= GiB else f"{n / MiB:9.1f} MiB"

        lines = [f"peak at: {self.peak_phase}"]
        lines += [f"  {name:<18} {fmt(getattr(self, name))}" for name in self.parts]
        lines.append(f"  {'total':<18} {fmt(self.total)}")
        if self.paged_states:
            lines.append(f"  {'(paged states':<18} {fmt(self.paged_states)}: outside torch's pool)")
        lines.append(f"  saved for backward by the end of the forward: {fmt(self.saved_activations).strip()}, "
                     f"all gradients: {fmt(self.all_gradients).strip()}")
        return "\n".join(lines)


def _moment(name: str, **parts: int) -> tuple[int, str, dict[str, int]]:
    keys = ("gradients", "activations", "recompute", "logits", "working_set")
    d = {k: parts.get(k, 0) for k in keys}
    return sum(d.values()), name, d


def training_memory(config, method: str, *, batch_size: int, seq_len: int, lora_r: int = 64,
                    lora_targets=LLAMA_TARGETS, gradient_checkpointing: bool = True, optimizer: str = "adamw",
                    world_size: int = 1, sharding: str = "none", cpu_offload: bool = False,
                    **settings) -> MemoryBreakdown:
    """Predict the peak memory of one training step (see the module docstring for every term).

    Args:
        config: a Llama-style transformers config (``LlamaConfig``, or :func:`llama_config`).
        method: ``"full"``, ``"lora"`` (bf16 base) or ``"qlora"`` (NF4 base, double quantization).
        batch_size, seq_len: the batch is ``(batch_size, seq_len)`` token ids, labels = inputs.
        lora_r: LoRA rank (``lora`` and ``qlora``).
        lora_targets: which projections get adapters (default: all seven).
        gradient_checkpointing: keep one input per layer and recompute the layer in the backward.
        optimizer: ``"adamw"`` (two float32 states, updated in place), ``"adamw8bit"`` (bitsandbytes'
            blockwise 8-bit states), ``"paged_adamw"`` / ``"paged_adamw8bit"`` (the same states, those of
            >= 1e5 elements in CUDA unified memory: counted in ``total``, listed in ``paged_states``, not in
            ``torch_peak``), ``"sgd"`` (no state).
        world_size, sharding, cpu_offload: ``sharding="fsdp"`` predicts one GPU of ``world_size`` that PyTorch
            FSDP shards the model over (chapter 11, :mod:`qlora_edu.ch11_fsdp.sharding`): ``batch_size`` is then
            each GPU's micro-batch; parameters, gradients and optimizer states are divided among the GPUs (the NF4
            constants and buffers are not: every GPU keeps them whole); ``frozen_weights`` also holds the units
            all-gathered at the peak (the root: embedding, final norm, ``lm_head``; two decoder layers, their
            adapters included), ``gradients`` one layer's whole adapter gradients before their reduce-scatter;
            ``prepare_kbit`` defaults to False (FSDP-QLoRA keeps the unquantized weights in bf16).
            ``cpu_offload``: the shards live in host memory and the optimizer steps there. The default
            (``"none"``, ``world_size=1``) is one GPU holding everything.
        **settings: the other choices of the recipe (module docstring); unknown ones raise ``TypeError``.

    Returns:
        a :class:`MemoryBreakdown`; ``.total`` is the predicted peak in bytes (of one GPU).
    """
    fsdp = check_sharding_args(world_size, sharding, cpu_offload)
    if fsdp and "prepare_kbit" not in settings:
        settings = {**settings, "prepare_kbit": False}
    shape, targets, s = check_training_memory_args(config, method, batch_size, seq_len, lora_r, lora_targets,
                                                   gradient_checkpointing, optimizer, settings)
    rc = _recipe(shape, method, batch_size, seq_len, lora_r, targets, gradient_checkpointing, optimizer, s)
    T, h, V, L, a = rc.tokens, shape.hidden, shape.vocab, shape.layers, rc.alloc

    # static memory: weights, gradients, optimizer states, each tensor rounded as the allocator hands it out
    tensors = static_tensors(config, method, lora_r=lora_r, lora_targets=targets, optimizer=optimizer, **settings)
    frozen = sum(a(t.nbytes) for t in tensors if t.part == "frozen_weights")
    weights = sum(a(t.nbytes) for t in tensors if t.part == "trainable_weights")
    grad_list = [t for t in tensors if t.part == "gradients"]
    all_grads = sum(a(t.nbytes) for t in grad_list)
    state_bytes = sum(a(t.nbytes) for t in tensors if t.part == "optimizer_states")
    paged = sum(a(t.nbytes) for t in tensors if t.part == "optimizer_states" and t.paged)

    def grads(keep) -> int:
        """Bytes of the gradients of the trainable tensors ``(layer, module)`` that ``keep`` selects."""
        return sum(a(t.nbytes) for t in grad_list if keep(t.layer, t.module))

    def total_of(items: list[_Saved], stages: tuple[str, ...] | None = None) -> int:
        return sum(a(x.nbytes) for x in items if stages is None or x.stage in stages)

    # what the forward saves
    first, later = _layer_saved(shape, rc, first=True), _layer_saved(shape, rc, first=False)
    A0, A = total_of(first), total_of(later)
    ckpt_input = a(T * h * rc.rd)
    outside, model_saved = _outside_saved(shape, rc), _model_saved(shape, rc)
    rotary = 2 * a(rc.seq * shape.head_dim * rc.rd)  # alive all step: saved, or held by the checkpoints
    held_rotary = rotary if rc.ckpt else 0
    layers_saved = L * ckpt_input if rc.ckpt else A0 + (L - 1) * A
    saved = layers_saved + total_of(outside) + total_of(model_saved)
    # gradients made before the layers' backward: lm_head's (with tied embeddings, the shared weight's) and
    # the final norm's (full fine-tuning)
    head_modules = ("lm_head", "norm") + (("embed_tokens",) if shape.tied else ())
    head_grads = grads(lambda layer, m: m in head_modules)
    g = a(T * h * rc.rd)  # the gradient arriving at a layer's output (and at the final norm)

    # the moments of the step that can be the peak
    moments = [_moment("loss backward (cross-entropy gradient)", activations=saved + held_rotary,
                       logits=2 * a(T * V * 4))]
    head_saved = saved - total_of(outside, ("loss",))
    if rc.method == "full":  # lm_head's backward: the logits' gradient and the head's weight gradient
        moments.append(_moment("lm_head backward", activations=head_saved + held_rotary, gradients=head_grads,
                               logits=a(T * V * 4) + (a(T * V * rc.hd) if rc.hd != 4 else 0), working_set=g))
    moments.append(_moment("final norm backward", activations=head_saved + held_rotary, gradients=head_grads,
                           working_set=a(T * h * rc.hd) + _norm_backward_extra(rc, shape)))
    out_alive = g if rc.reentrant else 0  # reentrant checkpointing keeps the recomputed layer output
    for k in sorted({L - 1, 0}, reverse=True):
        items, A_k = (first, A0) if k == 0 else (later, A)
        done = head_grads + grads(lambda layer, m, k=k: layer is not None and layer > k)
        if rc.ckpt:  # the inputs of layers 0..k are still checkpointed
            resident = (k + 1) * ckpt_input + rotary
        else:  # the saved tensors of layers 0..k-1
            resident = (A0 + (k - 1) * A if k > 0 else 0) + total_of(model_saved)
        for stage, layer_alive, temp, modules in _layer_stages(rc, shape, items):
            moments.append(_moment(f"backward of layer {k} ({stage})", activations=resident + (
                0 if rc.ckpt else layer_alive), recompute=layer_alive if rc.ckpt else 0,
                gradients=done + grads(lambda layer, m, k=k, mods=modules: layer == k and m in mods),
                working_set=g + out_alive + temp))
        # the layer's forward at down_proj: re-run under checkpointing (gradients of later layers exist),
        # else the first forward (only the last layer's can matter)
        if rc.ckpt or k == L - 1:
            fwd_alive, fwd_temp = _linear_forward(rc, shape, "down_proj")
            p_in = 0 if _shares_input(rc, ("down_proj",)) else a(T * shape.intermediate * rc.rd)
            before_down = A_k - total_of(items, ("down",)) + fwd_alive
            moments.append(_moment(f"forward of layer {k} (down_proj)" + (", recomputed" if rc.ckpt else ""),
                                   activations=resident + (0 if rc.ckpt else before_down),
                                   recompute=before_down if rc.ckpt else 0, gradients=done if rc.ckpt else 0,
                                   working_set=(g if rc.ckpt else 0) + p_in + fwd_temp))
    step_temp = a(state_bytes // 2) if (rc.foreach and rc.optimizer in ("adamw", "paged_adamw")) else 0
    moments.append(_moment("optimizer step", gradients=all_grads, working_set=step_temp))
    if rc.method == "full":  # the embedding's gradient arrives last; tied: added into lm_head's gradient
        moments.append(_moment("embedding backward", gradients=all_grads,
                               working_set=g + (a(V * h * rc.wd) if shape.tied else 0)))

    if fsdp:  # one GPU of world_size: shards, replicated tensors, the units gathered at the peak
        frozen, weights, state_bytes, paged, moments = _sharded(tensors, world_size, cpu_offload, paged, moments, a)
    peak, phase, at_peak = max(moments, key=lambda m: m[0])
    static = frozen + weights + state_bytes
    return MemoryBreakdown(frozen_weights=frozen, trainable_weights=weights, optimizer_states=state_bytes,
                           workspace=rc.workspace, total=static + peak + rc.workspace, paged_states=paged,
                           saved_activations=saved, all_gradients=all_grads, peak_phase=phase,
                           layer_saved=tuple((x.name, a(x.nbytes)) for x in later), **at_peak)


def _sharded(tensors, world_size: int, cpu_offload: bool, paged: int, moments: list, a) -> tuple:
    """The static parts and the moments of :func:`training_memory` for one GPU of ``world_size`` under FSDP
    (chapter 11's :func:`~qlora_edu.ch11_fsdp.sharding.per_gpu_static` and :func:`~qlora_edu.ch11_fsdp.sharding.
    sharded_units`): the gradients alive at each moment are sharded, plus one layer's whole before its
    reduce-scatter; with ``cpu_offload`` the sharded gradients are on the host and the optimizer steps there."""
    from qlora_edu.ch11_fsdp.sharding import per_gpu_static, sharded_units

    parts, units = per_gpu_static(tensors, world_size, cpu_offload=cpu_offload), sharded_units(tensors)
    frozen = a(parts["frozen_weights"]) + a(units.gathered)
    paged = 0 if cpu_offload else -(-paged // world_size)

    def on_gpu(moment: tuple[int, str, dict[str, int]]) -> tuple[int, str, dict[str, int]]:
        _, name, d = moment
        step = name == "optimizer step"
        sharded = 0 if cpu_offload else -(-d["gradients"] // world_size)
        d = {**d, "gradients": sharded + (0 if step else a(units.layer_grads))}
        if step and cpu_offload:
            d["working_set"] = 0
        return sum(d.values()), name, d

    return (frozen, a(parts["trainable_weights"]), a(parts["optimizer_states"]), paged,
            [on_gpu(m) for m in moments])


# ----------------------------------------------------------------------------------------------
# Model shapes and "what fits"


def llama_config(name: str):
    """A ``LlamaConfig`` (no weights) for ``"7B"``, ``"13B"``, ``"33B"``, ``"65B"`` (LLaMA-1 shapes: 128-dim
    heads, vocab 32000, untied embeddings) or ``"course"`` / ``"SmolLM2-135M"`` (the course model).

    Args:
        name: one of the names above (case-insensitive; ``"llama-7b"`` works too).

    Returns:
        ``transformers.LlamaConfig`` with the shape filled in (other fields at their defaults).
    """
    key = check_llama_config_args(name)
    from transformers import LlamaConfig

    if key == "course":
        return LlamaConfig(max_position_embeddings=8192, **COURSE_MODEL_SHAPE)
    dims = LLAMA_SHAPES[key]
    heads = dims.hidden // 128
    return LlamaConfig(hidden_size=dims.hidden, intermediate_size=dims.intermediate,
                       num_hidden_layers=dims.n_layers, num_attention_heads=heads, num_key_value_heads=heads,
                       vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048)


def fits(config, method: str, gpu_bytes: int, **kwargs) -> bool:
    """Whether :func:`training_memory` ``(config, method, **kwargs).total`` is at most ``gpu_bytes``.

    ``gpu_bytes`` is the memory torch may use: a card's capacity minus the CUDA context (~0.5 GiB) and
    some slack for fragmentation."""
    gpu_bytes = check_fits_args(config, method, gpu_bytes)
    return training_memory(config, method, **kwargs).total <= gpu_bytes


def largest_batch_size(config, method: str, gpu_bytes: int, *, seq_len: int, max_batch_size: int = 4096,
                       **kwargs) -> int:
    """The largest batch size (sequences of ``seq_len`` tokens) whose step fits in ``gpu_bytes``; 0 if
    even one sequence does not fit. Memory grows with the batch, so a bisection finds it.

    Args:
        config, method, **kwargs: as for :func:`training_memory`.
        gpu_bytes: usable GPU memory in bytes (see :func:`fits`).
        seq_len: tokens per sequence.
        max_batch_size: the search stops there.
    """
    gpu_bytes = check_largest_batch_size_args(config, method, gpu_bytes, seq_len, max_batch_size)

    def ok(b: int) -> bool:
        return training_memory(config, method, batch_size=b, seq_len=seq_len, **kwargs).total <= gpu_bytes

    return _bisect(ok, max_batch_size)


def largest_seq_len(config, method: str, gpu_bytes: int, *, batch_size: int = 1, multiple_of: int = 64,
                    max_seq_len: int = 1 << 20, **kwargs) -> int:
    """The longest sequence (a multiple of ``multiple_of`` tokens) whose step fits in ``gpu_bytes`` at
    ``batch_size``; 0 if none does. Never longer than the model's ``max_position_embeddings``: a longer
    sequence is not one the model can take, whatever the memory (LLaMA-1 7B: 2,048).

    Args:
        config, method, **kwargs: as for :func:`training_memory`.
        gpu_bytes: usable GPU memory in bytes (see :func:`fits`).
        batch_size: sequences per batch.
        multiple_of: granularity of the answer.
        max_seq_len: the search stops there (or at the model's positions, if fewer).
    """
    gpu_bytes = check_largest_seq_len_args(config, method, gpu_bytes, batch_size, multiple_of, max_seq_len)
    max_seq_len = min(max_seq_len, getattr(config, "max_position_embeddings", None) or max_seq_len)

    def ok(n: int) -> bool:
        return training_memory(config, method, batch_size=batch_size, seq_len=n * multiple_of,
                               **kwargs).total <= gpu_bytes

    return _bisect(ok, max_seq_len // multiple_of) * multiple_of


def largest_model(method: str, gpu_bytes: int, *, batch_size: int = 1, seq_len: int = 512,
                  candidates=("7B", "13B", "33B", "65B"), **kwargs):
    """The largest of ``candidates`` (names for :func:`llama_config`, or configs) that can be trained with
    ``method`` in ``gpu_bytes``, or ``None``. Candidates are tried in the order given; the last that fits
    is returned, so list them from small to large.

    Args:
        method, **kwargs: as for :func:`training_memory`.
        gpu_bytes: usable GPU memory in bytes (see :func:`fits`).
        batch_size, seq_len: the batch.
        candidates: model names or configs, small to large.
    """
    gpu_bytes, candidates = check_largest_model_args(method, gpu_bytes, batch_size, seq_len, candidates)
    best = None
    for c in candidates:
        config = llama_config(c) if isinstance(c, str) else c
        if training_memory(config, method, batch_size=batch_size, seq_len=seq_len, **kwargs).total <= gpu_bytes:
            best = c
    return best


def _bisect(ok, high: int) -> int:
    """Largest n in [1, high] with ok(n), assuming ok is monotone (True then False); 0 if ok(1) is False."""
    if not ok(1):
        return 0
    lo, hi = 1, high
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo
