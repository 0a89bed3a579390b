"""transformers' RMS-type normalisation classes, mapped onto the ``rmsnorm`` adapter.

Each entry is a :func:`curvlab.register_layer` mapping by qualified class name: nothing of
transformers is imported (a model that contains one of these classes has imported its module).
Every class listed computes ``w ⊙ x / sqrt(mean x² + ε)`` over the last dim (Gemma's compute
``(1 + w) ⊙ x̂``, which has the same Fisher w.r.t. w); tests/plugins/adapters/test_rmsnorm.py
checks each one that the installed transformers has against that formula.
"""

from __future__ import annotations

from curvlab.layers import register_layer
from curvlab.plugins.adapters import normalization  # noqa: F401 - registers 'rmsnorm' first

#: (module, class, attribute holding ε)
HF_RMS_NORMS = (
    ("transformers.models.llama.modeling_llama", "LlamaRMSNorm", "variance_epsilon"),
    ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm", "variance_epsilon"),
    ("transformers.models.mixtral.modeling_mixtral", "MixtralRMSNorm", "variance_epsilon"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm", "variance_epsilon"),
    ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeRMSNorm", "variance_epsilon"),
    ("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm", "variance_epsilon"),
    ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeRMSNorm", "variance_epsilon"),
    ("transformers.models.phi3.modeling_phi3", "Phi3RMSNorm", "variance_epsilon"),
    ("transformers.models.olmo2.modeling_olmo2", "Olmo2RMSNorm", "variance_epsilon"),
    ("transformers.models.granite.modeling_granite", "GraniteRMSNorm", "variance_epsilon"),
    (
        "transformers.models.deepseek_v3.modeling_deepseek_v3",
        "DeepseekV3RMSNorm",
        "variance_epsilon",
    ),
    ("transformers.models.smollm3.modeling_smollm3", "SmolLM3RMSNorm", "variance_epsilon"),
    ("transformers.models.gemma.modeling_gemma", "GemmaRMSNorm", "eps"),
    ("transformers.models.gemma2.modeling_gemma2", "Gemma2RMSNorm", "eps"),
    ("transformers.models.gemma3.modeling_gemma3", "Gemma3RMSNorm", "eps"),
    ("transformers.models.t5.modeling_t5", "T5LayerNorm", "variance_epsilon"),
    ("transformers.models.mt5.modeling_mt5", "MT5LayerNorm", "variance_epsilon"),
    ("transformers.models.longt5.modeling_longt5", "LongT5LayerNorm", "variance_epsilon"),
    ("transformers.models.umt5.modeling_umt5", "UMT5LayerNorm", "variance_epsilon"),
)

for _module, _name, _eps in HF_RMS_NORMS:
    register_layer(f"{_module}.{_name}", "rmsnorm", eps=_eps)
