"""Where the neurons of each architecture live: one declarative table keyed by `model_type`.

A neuron is one channel of an MLP's hidden layer. Its activation is the input of the MLP's output
projection (`act(gate) * up` for gated MLPs, `act(fc(x))` otherwise), so that input is where the
hooks read and the projections around it are what pruning edits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from lmprune.core.errors import LmpruneError


@dataclass(frozen=True)
class MLPLayout:
    """How one architecture lays out its MLPs."""

    layers: tuple[str, ...]
    """Candidate dotted paths (from the model) of the decoder-block list; the first that exists."""
    mlp: str
    """Path from a block to the module that owns the projections ("" when the block owns them)."""
    inputs: tuple[str, ...]
    """Projections that write the hidden layer: each has one output row per neuron."""
    output: str
    """Projection reading the hidden layer; its input is the neuron activation (the hook point)."""
    conv1d: bool = False
    """GPT-2's `Conv1D` stores weights as [in, out], so the neuron axis is flipped."""
    fused_gate_up: bool = False
    """Phi-3's `gate_up_proj` is [2 * d_mlp, d_model]: neuron j owns rows j and d_mlp + j."""
    width_key: str = "intermediate_size"
    """Config key of the MLP width (read from `text_config` when the config has one)."""
    output_bias: bool = False
    """The output projection has a bias of its own (a config may still turn it off: OPT's
    `enable_bias: false`). An edit that folds a shift into it (lmprune act) needs one."""
    bias_key: str | None = None
    """Config flag that gives the MLP's projections biases and changes nothing else (LLaMA's
    `mlp_bias`): how such an edit gets an output bias where there is none of its own."""


_GATED = MLPLayout(
    layers=("model.layers", "model.language_model.layers"),
    mlp="mlp",
    inputs=("gate_proj", "up_proj"),
    output="down_proj",
)

# LLaMA-style gated MLPs whose config can add biases to the three projections (and nothing else)
_GATED_BIAS_KEY = replace(_GATED, bias_key="mlp_bias")

ARCHITECTURES: dict[str, MLPLayout] = {
    "gpt2": MLPLayout(("transformer.h",), "mlp", ("c_fc",), "c_proj", conv1d=True,
                      width_key="n_inner", output_bias=True),
    "gptj": MLPLayout(("transformer.h",), "mlp", ("fc_in",), "fc_out", width_key="n_inner",
                      output_bias=True),
    "gpt_neox": MLPLayout(("gpt_neox.layers",), "mlp", ("dense_h_to_4h",), "dense_4h_to_h",
                          output_bias=True),
    "opt": MLPLayout(("model.decoder.layers",), "", ("fc1",), "fc2", width_key="ffn_dim",
                     output_bias=True),
    "phi": MLPLayout(("model.layers",), "mlp", ("fc1",), "fc2", output_bias=True),
    "phi3": MLPLayout(("model.layers",), "mlp", ("gate_up_proj",), "down_proj",
                      fused_gate_up=True),
    "llama": _GATED_BIAS_KEY,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "gemma": _GATED,
    "gemma2": _GATED,
    "gemma3": _GATED,
    "gemma3_text": _GATED,
    "olmo": _GATED,
    "olmo2": _GATED,
    "granite": _GATED_BIAS_KEY,
}


def layout_for(model_type: str) -> MLPLayout:
    if model_type not in ARCHITECTURES:
        raise LmpruneError(
            f"unsupported model_type '{model_type}': lmprune knows where the MLP neurons are for "
            f"{', '.join(sorted(ARCHITECTURES))}; add an entry to "
            "lmprune/core/arch.py:ARCHITECTURES"
        )
    return ARCHITECTURES[model_type]


@dataclass(frozen=True)
class WeightSlice:
    """Neuron j of a layer occupies index `offset + j` along `dim` of `param`."""

    name: str
    param: nn.Parameter
    dim: int
    offset: int = 0


def _submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


class NeuronMap:
    """The MLP neurons of one loaded model: layers, widths, hook points and weight slices."""

    def __init__(self, model: nn.Module):
        self.model_type = model.config.model_type
        self.layout = layout_for(self.model_type)
        self.blocks_path = next(
            (p for p in self.layout.layers if _has_submodule(model, p)), None
        )
        if self.blocks_path is None:
            raise LmpruneError(
                f"{type(model).__name__} ({self.model_type}) has none of the expected block lists "
                f"{list(self.layout.layers)}; is this a bare backbone instead of a causal LM?"
            )
        blocks = model.get_submodule(self.blocks_path)
        self.mlps: list[nn.Module] = [_submodule(b, self.layout.mlp) for b in blocks]
        prefix = f"{self.blocks_path}.{{}}" + (f".{self.layout.mlp}" if self.layout.mlp else "")
        self._mlp_names = [prefix.format(i) for i in range(len(self.mlps))]

    @property
    def num_layers(self) -> int:
        return len(self.mlps)

    def output_projection(self, layer: int) -> nn.Module:
        return getattr(self.mlps[layer], self.layout.output)

    def width(self, layer: int) -> int:
        """Neurons in this layer, read from the output projection's weight."""
        # Linear weight [d_model, d_mlp]; Conv1D [d_mlp, d_model]
        weight = self.output_projection(layer).weight
        return weight.shape[0] if self.layout.conv1d else weight.shape[1]

    @property
    def widths(self) -> list[int]:
        return [self.width(i) for i in range(self.num_layers)]

    @property
    def hook_points(self) -> list[str]:
        """Full module names whose *input* is the neuron activation [batch, pos, d_mlp]."""
        return [f"{name}.{self.layout.output}" for name in self._mlp_names]

    def weight_slices(self, layer: int) -> list[WeightSlice]:
        """Every parameter slice that belongs to one neuron of this layer (weights and biases)."""
        mlp, layout = self.mlps[layer], self.layout
        # Linear weight is [out, in]: an input projection's neuron is a row, the output's a column.
        in_dim, out_dim = (1, 0) if layout.conv1d else (0, 1)
        slices = []
        for proj_name in layout.inputs:
            proj = getattr(mlp, proj_name)
            offsets = (0, self.width(layer)) if layout.fused_gate_up else (0,)
            for offset in offsets:
                slices.append(WeightSlice(f"{proj_name}.weight", proj.weight, in_dim, offset))
                if getattr(proj, "bias", None) is not None:
                    slices.append(WeightSlice(f"{proj_name}.bias", proj.bias, 0, offset))
        out = self.output_projection(layer)
        slices.append(WeightSlice(f"{layout.output}.weight", out.weight, out_dim))
        return slices

    def width_config(self, config) -> tuple[object, str]:
        """(config object, key) holding the MLP width; `text_config` for multimodal wrappers."""
        sub = getattr(config, "text_config", None) or config
        return sub, self.layout.width_key


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """'all', '3,4,5', '10-20' (inclusive) or a mix such as '1,4-6' -> sorted layer indices."""
    if spec.strip() == "all":
        return list(range(num_layers))
    layers: set[int] = set()
    for part in spec.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            lo, hi = int(first), int(last if dash else first)
        except ValueError:
            raise LmpruneError(f"--layers must be all, a list such as 3,4,5 or a range such as "
                               f"10-20, not '{spec}'") from None
        if not 0 <= lo <= hi < num_layers:
            raise LmpruneError(f"--layers {spec}: '{part.strip()}' is not within the model's "
                               f"layers 0-{num_layers - 1}")
        layers.update(range(lo, hi + 1))
    return sorted(layers)
