"""Small randomly initialised models of every supported architecture (for plumbing tests only); a vision-language
one has its MoE decoder in `text_config` and a one-block vision tower."""

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoModelForImageTextToText

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

# DeepSeek-V3-style sigmoid group-limited routing with a shared expert and one dense first layer
GROUPED = dict(
    moe_intermediate_size=32,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    n_shared_experts=1,
    first_k_dense_replace=1,
    num_hidden_layers=3,
)

CONFIGS = {
    "qwen3_moe": dict(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, head_dim=16),
    "qwen2_moe": dict(
        moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, shared_expert_intermediate_size=48
    ),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "gpt_oss": dict(
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(
        **GROUPED,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
    ),
    "glm4_moe": dict(**GROUPED, head_dim=16),
    "exaone_moe": dict(
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        num_shared_experts=1,
        first_k_dense_replace=1,
        num_hidden_layers=3,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
    "dots1": dict(**GROUPED, head_dim=16),
    "minimax": dict(
        num_local_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        num_hidden_layers=3,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
    ),
    "qwen3_next": dict(
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        shared_expert_intermediate_size=48,
        head_dim=16,
        num_hidden_layers=3,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
    ),
    "flex_olmo": dict(num_experts=8, num_experts_per_tok=2, pad_token_id=0),
    "jamba": dict(
        num_experts=8,
        num_experts_per_tok=2,
        num_hidden_layers=4,
        expert_layer_period=2,
        expert_layer_offset=1,
        attn_layer_period=2,
        attn_layer_offset=0,
        use_mamba_kernels=False,
        pad_token_id=0,
    ),
    "granitemoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        topk_method="group_limited_greedy",
        n_group=2,
        topk_group=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        num_hidden_layers=3,
    ),
    "granitemoeshared": dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=48),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2),
    "minimax_m2": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=16),
    "ernie4_5_moe": dict(
        moe_num_experts=8,
        moe_k=2,
        moe_intermediate_size=32,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
        num_hidden_layers=3,
        head_dim=16,
    ),
    "hunyuan_v1_moe": dict(num_experts=8, moe_topk=2, intermediate_size=32, head_dim=16, use_qk_norm=True),
    # chunked attention with RoPE / full attention without, a dense layer between two MoE layers
    "llama4_text": dict(
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=32,
        intermediate_size_mlp=96,
        num_hidden_layers=3,
        moe_layers=[0, 2],
        head_dim=16,
        attention_chunk_size=8,
        no_rope_layer_interval=2,
    ),
}

VISION = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=COMMON["hidden_size"])
IMAGE_TOKENS = dict(image_token_id=120, video_token_id=121)


def _mrope(section: list[int], partial: float) -> dict:
    """Multimodal rotary parameters for a head_dim of 16: `section` sums to 16 x partial / 2."""
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section, "partial_rotary_factor": partial}


CONFIGS.update(
    {
        # sparse attention: each query attends to the 8 keys its indexer picks (index_topk)
        "deepseek_v32": dict(
            **CONFIGS["deepseek_v3"], num_key_value_heads=4, index_n_heads=2, index_head_dim=16, index_topk=8
        ),
        "glm4v_moe": dict(
            text_config=dict(**GROUPED, head_dim=16, rope_parameters=_mrope([2, 1, 1], 0.5)),
            vision_config=VISION,
            **IMAGE_TOKENS,
            image_start_token_id=122,
            image_end_token_id=123,
        ),
        "qwen3_5_moe": dict(
            text_config=dict(
                **CONFIGS["qwen3_next"], rope_parameters={**_mrope([1, 1, 0], 0.25), "mrope_interleaved": True}
            ),
            vision_config=dict(**VISION, num_position_embeddings=16),
            **IMAGE_TOKENS,
            vision_start_token_id=122,
            vision_end_token_id=123,
        ),
        # DeepStack: the vision block's features are added after decoder layer 0
        "qwen3_vl_moe": dict(
            text_config=dict(
                **CONFIGS["qwen3_moe"], rope_parameters={**_mrope([2, 2, 4], 1.0), "mrope_interleaved": True}
            ),
            vision_config=dict(**VISION, num_position_embeddings=16, deepstack_visual_indexes=[0]),
            **IMAGE_TOKENS,
            vision_start_token_id=122,
            vision_end_token_id=123,
        ),
        "llama4": dict(
            text_config=CONFIGS["llama4_text"],
            vision_config=dict(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=128,  # the pixel shuffle's width: hidden_size / pixel_shuffle_ratio^2
                image_size=28,
                patch_size=7,
                vision_output_dim=32,
                projector_input_dim=32,
                projector_output_dim=32,
            ),
            image_token_index=IMAGE_TOKENS["image_token_id"],
            boi_token_index=122,
            eoi_token_index=123,
        ),
        # a text and a vision expert set per MoE layer (of widths 32 and 16), shared experts beside them
        "ernie4_5_vl_moe": dict(
            text_config=dict(
                moe_num_experts=8,
                moe_k=2,
                moe_intermediate_size=[32, 16],
                moe_num_shared_experts=1,
                num_hidden_layers=3,
                head_dim=16,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]},
            ),
            vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=48, patch_size=4),
            **IMAGE_TOKENS,
            image_start_token_id=122,
            image_end_token_id=123,
            video_start_token_id=124,
            video_end_token_id=125,
        ),
        # the thinker: audio and vision towers before a Qwen3-MoE decoder with DeepStack; no talker
        "qwen3_omni_moe": dict(
            thinker_config=dict(
                text_config=dict(
                    **COMMON,
                    **CONFIGS["qwen3_moe"],
                    rope_parameters={**_mrope([2, 2, 4], 1.0), "mrope_interleaved": True},
                ),
                vision_config=dict(**VISION, num_position_embeddings=16, deepstack_visual_indexes=[0]),
                audio_config=dict(
                    encoder_layers=1,
                    encoder_attention_heads=2,
                    encoder_ffn_dim=32,
                    d_model=32,
                    output_dim=COMMON["hidden_size"],
                    downsample_hidden_size=8,
                ),
                **IMAGE_TOKENS,
                vision_start_token_id=122,
                audio_token_id=124,
                audio_start_token_id=125,
            ),
            enable_audio_output=False,
        ),
        "kimi_k25": dict(
            text_config=dict(**CONFIGS["deepseek_v3"], model_type="deepseek_v3"),
            vision_config=dict(
                num_hidden_layers=1,
                hidden_size=32,
                num_attention_heads=2,
                intermediate_size=48,
                pos_emb_height=8,
                pos_emb_width=8,
                pos_emb_time=2,
            ),
            **IMAGE_TOKENS,
            vision_start_token_id=122,
            vision_end_token_id=123,
            projection_hidden_size=32,
        ),
    }
)


# Any other MoE family: its config class's defaults, shrunk (`auto_kwargs`), with these corrections where a family's
# own checks or layer pattern ask for them.
SHRUNK_TEXT = dict(
    COMMON,
    moe_intermediate_size=32,
    head_dim=16,
    shared_expert_intermediate_size=48,
    moe_hidden_size=32,
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 8),
    **dict.fromkeys(("num_experts_per_tok", "moe_k", "moe_topk", "num_experts_per_token", "top_k_experts"), 2),
    **dict(n_group=2, num_expert_group=2, topk_group=1),
    **dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    **dict(vocab_size_per_layer_input=128, hidden_size_per_layer_input=16),
)
SHRUNK_TOWER = dict(
    depth=1,
    num_hidden_layers=1,
    n_layers=1,
    hidden_size=32,
    num_heads=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=48,
    adapter_in_dim=32,
    adapter_input_size=32,
    **dict.fromkeys(("text_hidden_size", "out_hidden_size", "adapter_out_dim", "output_dim"), COMMON["hidden_size"]),
)
TINY_LAYERS = 4
OVERRIDES = {
    "gemma4": dict(text_config=dict(enable_moe_block=True)),
    "diffusion_gemma": dict(text_config=dict(enable_moe_block=True)),
    "granitemoehybrid": dict(layer_types=["mamba", "attention", "mamba", "attention"]),
    "nemotron_h_omni": dict(vision_config=dict(video_temporal_patch_size=2)),
    "zaya": dict(num_experts_per_tok=1),
    "axk2": dict(num_key_value_heads=4),
    "glm_moe_dsa": dict(num_key_value_heads=4),
    "mistral_large4": dict(text_config=dict(num_key_value_heads=4)),
    "dots3_note": dict(text_config=dict(num_key_value_heads=4, head_dim=16)),
    "inkling2": dict(text_config=dict(num_key_value_heads=4)),
    "qwen4_exp": dict(
        text_config=dict(
            ngram_vocab_size_base=128,
            indexer_n_heads=2,
            indexer_kv_heads=1,
            indexer_head_dim=16,
            indexer_budget=16,
            indexer_compress_ratio=4,
        )
    ),
    "glm5_next": dict(text_config=dict(num_key_value_heads=4, qk_rope_head_dim=0, qk_nope_head_dim=16)),
    "deepseek_ocr2": dict(text_config=dict(mlp_layer_types=["dense", "sparse", "sparse", "sparse"])),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv", "full_attention"], num_dense_layers=1),
}


def _layer_pick(defaults: dict, layers: int) -> tuple[list[int] | None, dict]:
    """Which of a config's default layers to keep (every kind of layer its per-layer lists name, the first, and for a
    text decoder the last, at least `layers` of them), and those per-layer lists."""
    n = defaults.get("num_hidden_layers")
    if not isinstance(n, int) or n <= layers:
        return None, {}
    types = (list, str) if layers > 1 else list  # a tower's strings are names (hidden_act "gelu"), not patterns
    per_layer = {k: v for k, v in defaults.items() if isinstance(v, types) and len(v) == n}
    kinds = [tuple(v[i] for v in per_layer.values()) for i in range(n)]
    pick = {kinds.index(k) for k in set(kinds)} | ({0} if layers == 1 else {0, n - 1})
    while len(pick) < layers:
        pick.add(min(set(range(n)) - pick))
    return sorted(pick), per_layer


def auto_kwargs(config_class, sizes: dict = SHRUNK_TEXT, text: bool = True) -> dict:
    """Keyword arguments making a tiny config of `config_class` from its defaults: small widths, 8 experts of top-2,
    four decoder layers of every kind it has, towers of one block; token ids inside the small vocabulary."""
    try:
        defaults = config_class().to_dict()
    except Exception:  # noqa: BLE001 - a config without usable defaults gets only its sub-configs shrunk
        defaults = {}
    kw = {
        k: v
        for k, v in sizes.items()
        if k in defaults and not isinstance(defaults[k], bool) and (defaults[k] is None or isinstance(defaults[k], int))
    }
    if "qk_rope_head_dim" in defaults:  # multi-head latent attention derives its head_dim
        kw.pop("head_dim", None)
    kw.update({k: 0 for k in ("pad_token_id", "bos_token_id", "eos_token_id") if _at_least(defaults.get(k), 128)})
    if isinstance(defaults.get("per_layer_config"), dict):  # overrides of layers the tiny model does not have
        kw["per_layer_config"] = {}
    pick, per_layer = _layer_pick(defaults, TINY_LAYERS if text else 1)
    if pick is not None:
        kw["num_hidden_layers"] = len(pick)
        kw.update(
            {
                k: [v[i] for i in pick] if isinstance(v, list) else "".join(v[i] for i in pick)
                for k, v in per_layer.items()
            }
        )
        if isinstance(defaults.get("first_k_dense_replace"), int):
            kw["first_k_dense_replace"] = min(defaults["first_k_dense_replace"], 1)
    elif text and isinstance(defaults.get("num_hidden_layers"), int):
        kw["num_hidden_layers"] = min(defaults["num_hidden_layers"], TINY_LAYERS)
    for name, sub in (getattr(config_class, "sub_configs", None) or {}).items():
        default = defaults.get(name)
        if isinstance(default, dict) and "model_type" in default and not hasattr(sub, "model_type"):  # AutoConfig
            sub = CONFIG_MAPPING[default["model_type"]]
        if isinstance(sub, type) and name in defaults:
            is_text = "text" in name or "thinker" in name
            kw[name] = auto_kwargs(sub, SHRUNK_TEXT if is_text else SHRUNK_TOWER, is_text)
            if isinstance(default, dict) and "model_type" in default:
                kw[name]["model_type"] = default["model_type"]
    return kw


def _at_least(value, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= limit


def _merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merged(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def tiny_config(model_type: str):
    """A tiny config of any MoE family (`CONFIGS` where written by hand, else `auto_kwargs` and `OVERRIDES`)."""
    config_class = CONFIG_MAPPING[model_type]
    return config_class(**_merged(auto_kwargs(config_class), OVERRIDES.get(model_type, {})))


def tiny_model(model_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if model_type not in CONFIGS:
        from moecompress.models import get_adapter

        model = get_adapter(model_type).auto_model_class().from_config(tiny_config(model_type))
        return _randomized(model.eval())
    kwargs = CONFIGS[model_type]
    if "thinker_config" in kwargs:  # Qwen3-Omni: its adapter's class (transformers' has no forward)
        from moecompress.models import get_adapter

        model = get_adapter(model_type).auto_model_class()(CONFIG_MAPPING[model_type](**kwargs))
    elif "text_config" in kwargs:
        text = {**COMMON, **kwargs["text_config"], **overrides}
        model = AutoModelForImageTextToText.from_config(CONFIG_MAPPING[model_type](**{**kwargs, "text_config": text}))
    else:
        model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](**{**COMMON, **kwargs, **overrides}))
    return _randomized(model.eval())


def _randomized(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
            elif name.endswith(("experts.gate_up_proj_bias", "experts.down_proj_bias", "router.bias")):
                p.normal_(0, 0.2)  # GPT-OSS: expert and router biases (zero at init) take part too
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0, 0.1)
    return model


def routed_by_hand(view, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The block's routed output expert by expert through the view (`expert_inputs`, `expert_forward`)."""
    out = torch.zeros_like(x)
    for e in range(view.num_experts):
        tok, slot = torch.where(indices == e)
        inputs, w = view.expert_inputs(x[tok], weights[tok, slot])
        out.index_add_(0, tok, w[:, None] * view.expert_forward(e, inputs)[1])
    return out


def walked_states(model, adapter, batches) -> dict[int, list[torch.Tensor]]:
    """Per decoder layer, the hidden states leaving it in the layer-wise calibration engine (nothing compressed)."""
    from moecompress.calibration.engine import Walk, run_layerwise

    walked = {}
    done = lambda index, layer, hidden: walked.update({index: list(hidden)})  # noqa: E731
    run_layerwise(model, adapter, batches, lambda view, observer: False, Walk(progress=False, on_layer_done=done))
    return walked
