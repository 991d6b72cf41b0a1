"""Frozen pretrained feature extractors, defined in plain torch."""

from defectlens.backbones.registry import (
    FEATURE_KINDS,
    BackboneSpec,
    FeatureExtractor,
    available_backbones,
    create_backbone,
    fuse_conv_bn,
    get_spec,
    register_backbone,
)

__all__ = ["FEATURE_KINDS", "BackboneSpec", "FeatureExtractor", "available_backbones", "create_backbone", "fuse_conv_bn", "get_spec", "register_backbone"]
