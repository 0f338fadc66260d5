"""A plain Llama-family decoder over packed variable-length token streams.

There is no batch dimension: a micro-batch is one stream of `T` tokens holding several documents
back to back, and the metadata that travels with it (`BatchMeta`) says where each document starts
(`seqlens`) and which position each token has inside its own document (`position_ids`).
Attention is the only place documents interact, so every layer hands it to its attention core
(`Attention.core`, by default the kernels' `VarlenCausalAttention` over this process's tokens);
everything else is per token.

The model knows nothing of parallelism and never imports `seqmesh.parallel`. The parallelisms are
transforms applied afterwards (torchtitan style, see `trainer/parallelize.py`), which reach the
model through `parallel/model_protocol.py`: sequence parallelism swaps each `Attention.core` for
attention over a group of ranks (the metadata is then a `parallel.sequence.SPBatch`, which extends
`BatchMeta`), tensor parallelism swaps the linears for column/row-parallel ones and each layer's
`project` (how several linears read one input) for one that all-gathers the token shard once.

The modules are plain `nn.Linear` / `nn.Embedding` / `nn.RMSNorm` named exactly as in
transformers' `LlamaForCausalLM` (`model.layers.N.self_attn.q_proj`, ...), so HF weights map
one to one (see `hf_io.py`); the parameter-less `core` and `project` modules add no names.

Metrics read `Transformer.dims` (layer shapes) and `num_params(exclude_embeddings=True)` (the
weights every token multiplies through) to count FLOPs.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from seqmesh import first_use
from seqmesh.kernels.attention import PackedDocs, VarlenCausalAttention

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
# RoPE variants whose frequencies are fixed at construction. "dynamic" and "longrope" change the
# frequencies with the current sequence length, which has no single meaning for a packed stream.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class BatchMeta(PackedDocs, Protocol):
    """What the model reads of a micro-batch besides its tokens: the documents (for attention) and
    each local token's position inside its document [T] (for RoPE). ``parallel.sequence.SPBatch``
    (``make_sp_batch``) is the one the trainer builds."""

    position_ids: torch.Tensor


@dataclass(frozen=True)
class ModelDims:
    """Validated shapes of the model, read once from the HF config.

    Metrics derive FLOPs from these; parallel transforms derive shard sizes from them.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rms_norm_eps: float
    rope_type: str


def _rope_parameters(config: transformers.PretrainedConfig) -> dict[str, Any]:
    """RoPE settings under either transformers' v5 name (`rope_parameters`) or v4's (`rope_scaling` + `rope_theta`)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def model_dims(config: transformers.PretrainedConfig) -> ModelDims:
    """Check that `config` describes a model this module implements exactly, and return its shapes.

    Everything HF would silently compute differently from us is an error here, with the fix.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"seqmesh implements the decoders of model_type {SUPPORTED_MODEL_TYPES}, got {model_type!r} "
            f"(architectures={getattr(config, 'architectures', None)}); use a transformers LlamaConfig or Qwen2Config"
        )
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    if kv_heads is None:
        kv_heads = heads
    for name, value in (("hidden_size", hidden), ("num_attention_heads", heads), ("num_key_value_heads", kv_heads),
                        ("num_hidden_layers", config.num_hidden_layers), ("vocab_size", config.vocab_size),
                        ("intermediate_size", config.intermediate_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"model config: {name} must be a positive integer, got {value!r}")
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None:
        if hidden % heads:
            raise ValueError(
                f"model config: hidden_size={hidden} is not divisible by num_attention_heads={heads}; "
                "choose a head count that divides hidden_size, or set head_dim explicitly"
            )
        head_dim = hidden // heads
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"model config: head_dim must be a positive even number (RoPE rotates pairs), got {head_dim}")
    if heads % kv_heads:
        raise ValueError(
            f"model config: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}; "
            "grouped-query attention needs each key/value head shared by the same number of query heads"
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"model config: hidden_act must be 'silu' (SwiGLU MLP), got {act!r}")
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(
            f"model config: attention_dropout={config.attention_dropout} is not supported by the sequence-parallel "
            "attention kernels; set it to 0.0"
        )
    if model_type == "qwen2":
        layer_types = getattr(config, "layer_types", None) or []
        if getattr(config, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
            raise ValueError("model config: Qwen2 sliding-window attention is not supported; set use_sliding_window=False")
    rope = _rope_parameters(config)
    if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"model config: rope type {rope['rope_type']!r} is not supported; use one of {SUPPORTED_ROPE_TYPES} "
            "(length-dependent RoPE such as 'dynamic' or 'longrope' has no single meaning in a packed batch)"
        )
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("model config: partial_rotary_factor must be 1.0 (Llama rotates the whole head)")
    # Llama's attention_bias covers q, k, v and o; Qwen2 has fixed biases on q, k, v only.
    qkv_bias = model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
    o_bias = model_type == "llama" and bool(getattr(config, "attention_bias", False))
    return ModelDims(
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=hidden,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=model_type == "llama" and bool(getattr(config, "mlp_bias", False)),
        rms_norm_eps=float(config.rms_norm_eps),
        rope_type=rope["rope_type"],
    )


class RotaryEmbedding(nn.Module):
    """RoPE frequencies for one model; cos/sin are taken at each token's position inside its own document."""

    inv_freq: torch.Tensor

    def __init__(self, config: transformers.PretrainedConfig, head_dim: int) -> None:
        super().__init__()
        self.config = config
        self.head_dim = head_dim
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.attention_scaling = 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)compute the frequencies; scaled variants come from transformers so they match HF bit for bit."""
        rope = _rope_parameters(self.config)
        device = self.inv_freq.device
        if rope["rope_type"] == "default":
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim
            inv_freq, scaling = 1.0 / (rope["rope_theta"] ** exponent), 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](self.config, device)
        self.inv_freq = inv_freq.to(device=device, dtype=torch.float32)
        self.attention_scaling = float(scaling)

    def _apply(self, fn, recurse=True):
        # A model-wide cast (model.to(torch.bfloat16)) would round the frequencies, which puts the
        # angles of far positions off by whole radians; recompute them in fp32 instead.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.reset_parameters()
        return self

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim] in fp32, computed once per forward and shared by all layers."""
        freqs = position_ids.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.to(x.dtype)[:, None, :], sin.to(x.dtype)[:, None, :]
    return x * cos + _rotate_half(x) * sin


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@functools.cache
def _fused(fn):
    """``fn`` compiled by Inductor into one kernel per pass, for CUDA tensors.

    Eager, RoPE is five kernels (mul, neg, cat, mul, add) and SwiGLU two, each a full pass over
    memory, forward and again backward; in the 8B-shaped step at 32K tokens on an H200 such
    elementwise kernels took about a tenth of the kernel time next to cuDNN attention and the
    GEMMs. Compiled lazily (first CUDA call) and with dynamic shapes, since every micro-batch has
    its own token count; CPU runs stay eager (Inductor would build C++ there for no gain in tests).
    Compiles and recompiles are one-off costs the step loop keeps out of the cost model's fit.

    Inside a region that is being compiled already (``model.compile_layers``: the whole decoder layer's
    per-token halves), ``apply_rotary`` and ``swiglu`` trace the plain function instead, so Inductor
    fuses it with its neighbours (the casts, the norms, the residual adds) rather than Dynamo meeting
    a second ``torch.compile`` (and this cache, and ``first_use``) inside the first.
    """
    first_use.track_compiles()
    return torch.compile(fn, dynamic=True)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` [T, H, D] by per-token angles (cos/sin [T, D]), in HF's half-split layout.

    The angles are cast to x's dtype so that under autocast q and k stay in the same dtype as v
    (the attention kernels want one dtype), exactly as HF does for bf16 models.
    """
    return (_fused(_rotary) if x.is_cuda and not torch.compiler.is_compiling() else _rotary)(x, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gating ``silu(gate) * up`` (fused into one kernel on CUDA)."""
    return (_fused(_swiglu) if gate.is_cuda and not torch.compiler.is_compiling() else _swiglu)(gate, up)


class Projections(nn.Module):
    """Several linear maps of one input (q/k/v, gate/up), each on its own.

    ``rows``: how many rows the outputs must have (the tokens attention needs); the plain model's
    input has exactly those. Tensor parallelism replaces this module by one that all-gathers the
    rank's token shard once for all of the linears (``parallel/tensor.py``).
    """

    def forward(self, x: torch.Tensor, linears: tuple[nn.Module, ...],
                rows: int | None = None) -> tuple[torch.Tensor, ...]:
        return tuple(linear(x) for linear in linears)


class Attention(nn.Module):
    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        # Heads this module computes (tensor parallelism lowers them to the rank's share).
        self.num_heads, self.num_kv_heads, self.head_dim = dims.num_heads, dims.num_kv_heads, dims.head_dim
        self.q_proj = nn.Linear(dims.hidden_size, dims.num_heads * dims.head_dim, bias=dims.qkv_bias)
        self.k_proj = nn.Linear(dims.hidden_size, dims.num_kv_heads * dims.head_dim, bias=dims.qkv_bias)
        self.v_proj = nn.Linear(dims.hidden_size, dims.num_kv_heads * dims.head_dim, bias=dims.qkv_bias)
        self.o_proj = nn.Linear(dims.num_heads * dims.head_dim, dims.hidden_size, bias=dims.o_bias)
        self.project = Projections()
        self.core = VarlenCausalAttention()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        q, k, v = self.inputs(x, cos, sin)
        return self.output(self.core(q, k, v, meta, self.head_dim**-0.5))

    def inputs(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q [T, Hq, D], k and v [T, Hkv, D] for the core, RoPE applied; T is the rows of cos (the tokens
        attention sees), which under tensor parallelism are more than the rows of ``x`` (its token shard)."""
        tokens = cos.shape[0]
        q, k, v = self.project(x, (self.q_proj, self.k_proj, self.v_proj), tokens)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """The O projection of the core's output [T, Hq, D]."""
        return self.o_proj(out.reshape(out.shape[0], self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dims.hidden_size, dims.intermediate_size, bias=dims.mlp_bias)
        self.up_proj = nn.Linear(dims.hidden_size, dims.intermediate_size, bias=dims.mlp_bias)
        self.down_proj = nn.Linear(dims.intermediate_size, dims.hidden_size, bias=dims.mlp_bias)
        self.project = Projections()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.project(x, (self.gate_proj, self.up_proj))
        return self.down_proj(swiglu(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.self_attn = Attention(dims)
        self.mlp = MLP(dims)
        self.input_layernorm = nn.RMSNorm(dims.hidden_size, eps=dims.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(dims.hidden_size, eps=dims.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta)
        return x + self.mlp(self.post_attention_layernorm(x))

    # The layer as its two per-token halves around the attention core, which is the only part that
    # mixes tokens: what tiled layers run a tile at a time and compiled layers fuse (trainer/tiled.py,
    # trainer/compile_layers.py). ``split_forward`` computes exactly ``forward``; it calls the core
    # itself, so hooks on ``self_attn`` (activation offload's scopes without checkpointing) do not run.

    def attention_inputs(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Input norm, Q/K/V projections and RoPE: the core's q, k, v."""
        return self.self_attn.inputs(self.input_layernorm(x), cos, sin)

    def after_attention(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """O projection, residual, post-attention norm, MLP and residual: the layer's output."""
        h = x + self.self_attn.output(attn_out)
        return h + self.mlp(self.post_attention_layernorm(h))

    def split_forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        attn = self.self_attn
        q, k, v = self.attention_inputs(x, cos, sin)
        return self.after_attention(x, attn.core(q, k, v, meta, attn.head_dim**-0.5))


class Backbone(nn.Module):
    """The `model.` prefix of HF's parameter names: embeddings, layers, final norm."""

    def __init__(self, config: transformers.PretrainedConfig, dims: ModelDims) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(dims.vocab_size, dims.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(dims) for _ in range(dims.num_layers))
        self.norm = nn.RMSNorm(dims.hidden_size, eps=dims.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, dims.head_dim)


INIT_PIECE = 1 << 24  # elements of a weight drawn from one generator


@torch.no_grad()
def fill_normal(tensors: list[torch.Tensor], std: float) -> None:
    """Fill ``tensors`` with normal(0, ``std``) values on every core, reproducibly.

    Each ``INIT_PIECE``-element piece has its own generator, seeded from one draw of the global
    generator (so ``torch.manual_seed`` still decides the weights) and the piece's position, so the
    values depend on neither the number of threads nor their timing. Tensor ops release the GIL, so
    threads fill pieces in parallel (about 10 ns per value on one core: 2 minutes for 8B values)."""
    pieces = [flat[a:a + INIT_PIECE] for t in tensors if not t.is_meta
              for flat in (t.view(-1),) for a in range(0, flat.numel(), INIT_PIECE)]
    if not pieces:  # a model on the meta device: values come with ``to_empty`` and a later call
        return
    base = int(torch.randint(0, 1 << 62, (), device="cpu").item())

    @torch.no_grad()  # grad mode is per thread
    def fill(k: int, piece: torch.Tensor) -> None:
        g = torch.Generator(device=piece.device)
        g.manual_seed((base + k * 0x9E3779B97F4A7C15) % (1 << 63))  # well apart for every piece
        piece.normal_(0.0, std, generator=g)

    if len(pieces) <= 1:
        for k, piece in enumerate(pieces):
            fill(k, piece)
        return
    with cf.ThreadPoolExecutor(max_workers=min(len(pieces), torch.get_num_threads())) as pool:
        list(pool.map(fill, range(len(pieces)), pieces))


class Transformer(nn.Module):
    """Llama / Qwen2 causal LM over one packed token stream (see the module docstring)."""

    # The residual stream's dtype (``model.residual_dtype``). None keeps what the embedding gives: fp32
    # with fp32 weights, under autocast too, since each residual add promotes the bf16 projection output.
    # bf16 casts the embedding's output once; every add is then bf16 + bf16, so each layer's saved input,
    # the gradient flowing down the stream and every memory pass over it take half the bytes.
    residual_dtype: torch.dtype | None = None

    def __init__(self, config: transformers.PretrainedConfig) -> None:
        super().__init__()
        self.dims = model_dims(config)
        self.config = config
        device = torch.get_default_device()
        with torch.device("meta"):  # no default init of each linear: ``init_weights`` sets every value once
            self.model = Backbone(config, self.dims)
            self.lm_head = nn.Linear(self.dims.hidden_size, self.dims.vocab_size, bias=False)
        self.to_empty(device=device)
        self.tie_weights()
        self.init_weights()

    @classmethod
    def from_config_dict(cls, values: dict[str, Any]) -> Transformer:
        """Build from a plain dict (e.g. a Hydra `model:` group) holding `model_type` and HF config fields."""
        values = dict(values)
        model_type = values.pop("model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model.model_type must be one of {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
        return cls(transformers.AutoConfig.for_model(model_type, **values))

    def tie_weights(self) -> None:
        """Share one matrix between input embedding and output projection when the config ties them.

        Call again after anything that replaces parameters (`to_empty`, `load_state_dict(assign=True)`).
        """
        if self.dims.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """HF's initialisation (normal(0, initializer_range), zero biases, unit norms), so fresh models train alike.

        Separate from construction so a model built on the meta device can be materialised
        (`to_empty`) and initialised afterwards. The normal draws go through ``fill_normal``: PyTorch
        draws them on one core, which made a host-built Llama-3-8B take minutes to initialise.
        """
        std = getattr(self.config, "initializer_range", 0.02)
        weights: dict[int, torch.Tensor] = {}  # a tied weight once
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                weights[id(module.weight)] = module.weight
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, RotaryEmbedding):
                module.reset_parameters()
        fill_normal(list(weights.values()), std)


    def forward(self, input_ids: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        """Final-normed hidden states [T, hidden] for the local tokens `input_ids` [T] described by `meta`."""
        if input_ids.dim() != 1:
            raise ValueError(
                f"input_ids must be one packed stream of shape [T], got shape {tuple(input_ids.shape)}; "
                "concatenate the documents and describe their lengths in the batch metadata"
            )
        if meta.position_ids.shape != input_ids.shape:
            raise ValueError(
                f"meta.position_ids has shape {tuple(meta.position_ids.shape)} but input_ids has "
                f"{tuple(input_ids.shape)}; build both from the same batch layout (shard_tokens)"
            )
        x = self.model.embed_tokens(input_ids)
        x = x if self.residual_dtype is None else x.to(self.residual_dtype)
        cos, sin = self.model.rotary_emb(meta.position_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, meta)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, each shared tensor once.

        `exclude_embeddings` drops the input-embedding table, which is a lookup and costs no FLOPs;
        with tied embeddings the same matrix is also the output projection, a matmul every token
        pays for, so it stays counted. The result is then "weights every token multiplies through",
        the figure for FLOPs = 6 * N per trained token (plus attention).
        """
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and not self.dims.tie_embeddings:
            total -= self.model.embed_tokens.weight.numel()
        return total


_TINY_DEFAULTS: dict[str, Any] = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    initializer_range=0.02,
)


def tiny_config(**overrides: Any) -> transformers.LlamaConfig:
    """A ~5M-parameter Llama (GQA 8/4 heads, tied embeddings) for tests and the default CPU job.

    Pass `vocab_size` from the tokenizer; any other LlamaConfig field may be overridden.
    """
    known = set(transformers.LlamaConfig().to_dict()) | {"rope_theta", "rope_scaling"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"tiny_config: unknown LlamaConfig field(s) {unknown}; valid fields include {sorted(known)}")
    values = {**_TINY_DEFAULTS, **overrides}
    if ("rope_parameters" in overrides or "rope_scaling" in overrides) and "rope_theta" not in overrides:
        values.pop("rope_theta")
    config = transformers.LlamaConfig(**values)
    model_dims(config)
    return config


__all__ = [
    "BatchMeta",
    "ModelDims",
    "Transformer",
    "apply_rotary",
    "swiglu",
    "model_dims",
    "tiny_config",
    "SUPPORTED_MODEL_TYPES",
    "SUPPORTED_ROPE_TYPES",
]
