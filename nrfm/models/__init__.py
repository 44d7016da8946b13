"""Network architectures: 3D ResNet and ViT backbones."""
