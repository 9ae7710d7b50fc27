"""Models: ResNet-18/50 and VGG-16 with torchvision-compatible names, feature hooks, loading, training, metrics.

See docs/models.md for the layer naming scheme and the checkpoint format.
"""

from engine.models.augment import Augment
from engine.models.checkpoint import load_checkpoint, load_model, save_checkpoint
from engine.models.classifier import (
    ARCHITECTURES,
    ImageClassifier,
    Normalize,
    available_models,
    backbone,
    build_model,
    dropout_modules,
    load_torchvision_state_dict,
    mc_dropout,
    set_mc_dropout,
)
from engine.models.conventions import (
    OUTPUT_KINDS,
    ForeignModel,
    InputConvention,
    input_shape,
    model_fingerprint,
)
from engine.models.evaluate import channel_stats, evaluate, label_with_model, predict_logits
from engine.models.features import (
    CONSTRAINED,
    EARLY_STAGES,
    RAW_MAX_SIDE,
    STAGE_OUTPUTS,
    FeatureExtractor,
    available_layers,
    cap_raw_map,
    early_stages,
    extract_pooled,
    feature_points,
    layer_shapes,
    pool_feature,
    resolve_layers,
    spatial_layers,
    stage_outputs,
)
from engine.models.memory import auto_batch_size, eval_mode, fast_input, input_layout, model_device, model_dtype
from engine.models.train import TrainConfig, TrainResult, train, train_model

__all__ = [
    "ARCHITECTURES",
    "CONSTRAINED",
    "EARLY_STAGES",
    "OUTPUT_KINDS",
    "STAGE_OUTPUTS",
    "Augment",
    "FeatureExtractor",
    "ForeignModel",
    "ImageClassifier",
    "InputConvention",
    "Normalize",
    "TrainConfig",
    "TrainResult",
    "auto_batch_size",
    "fast_input",
    "input_layout",
    "available_layers",
    "early_stages",
    "extract_pooled",
    "feature_points",
    "input_shape",
    "label_with_model",
    "available_models",
    "backbone",
    "build_model",
    "channel_stats",
    "dropout_modules",
    "eval_mode",
    "evaluate",
    "load_checkpoint",
    "load_model",
    "load_torchvision_state_dict",
    "mc_dropout",
    "model_fingerprint",
    "model_device",
    "model_dtype",
    "pool_feature",
    "cap_raw_map",
    "RAW_MAX_SIDE",
    "predict_logits",
    "resolve_layers",
    "save_checkpoint",
    "set_mc_dropout",
    "layer_shapes",
    "spatial_layers",
    "stage_outputs",
    "train",
    "train_model",
]
