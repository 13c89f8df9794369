"""MobileSAM's TinyViT image encoder in Keras, numerically matching the PyTorch reference.

This is a port of `tiny_vit_sam.py` from MobileSAM (Apache-2.0), built the way
`build_sam_vit_t` builds it: embed dims [64, 128, 160, 320], depths [2, 2, 6, 2],
heads [2, 4, 5, 10], windows [7, 7, 14, 7], MLP ratio 4, MBConv expansion 4, 3x3 local
convolutions, and the neck to 256 channels. It runs in inference mode only (batch norms
use their running statistics, no dropout or drop path), which is how the project uses
it: to compute frozen image embeddings for the mask decoder.

Input is `pixel_values` (B, 3, S, S) float32, channels-first, normalized like HF's
`SamImageProcessor` (S = 1024 for MobileSAM); output is (B, 256, S/16, S/16),
channels-first, the layout of `TFSamModel.get_image_embeddings`. Internally the
computation is channels-last (what TensorFlow's CPU kernels support).

`TinyViT.torch_params()` lists every weight under its key in MobileSAM's PyTorch state
dict (without the `image_encoder.` prefix) with its layout conversion (`to_keras`,
`to_torch`); that is how `tinyvit_weights` maps a checkpoint and names the arrays of a
converted cache.
"""

import itertools
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

EMBED_DIMS = (64, 128, 160, 320)
DEPTHS = (2, 2, 6, 2)
NUM_HEADS = (2, 4, 5, 10)
WINDOW_SIZES = (7, 7, 14, 7)
MLP_RATIO = 4
MBCONV_EXPAND_RATIO = 4
LOCAL_CONV_SIZE = 3
NECK_CHANNELS = 256

_BN_EPS = 1e-5  # torch.nn.BatchNorm2d default.
_LN_EPS = 1e-5  # torch.nn.LayerNorm default (attention and MLP norms).
_LN2D_EPS = 1e-6  # MobileSAM's LayerNorm2d in the neck.

# How a PyTorch tensor becomes the Keras variable's value.
_CONV = "conv"  # (O, I, kh, kw) -> (kh, kw, I, O)
_DWCONV = "dwconv"  # (C, 1, kh, kw) -> (kh, kw, C, 1)
_LINEAR = "linear"  # (O, I) -> (I, O)
_SAME = "same"  # unchanged

_TorchParams = List[Tuple[str, tf.Variable, str]]


def to_keras(value: np.ndarray, kind: str) -> np.ndarray:
  """A PyTorch tensor of conversion `kind` in the Keras variable's layout."""
  if kind == _CONV:
    return np.transpose(value, (2, 3, 1, 0))
  if kind == _DWCONV:
    return np.transpose(value, (2, 3, 0, 1))
  if kind == _LINEAR:
    return np.transpose(value, (1, 0))
  return value


def to_torch(value: np.ndarray, kind: str) -> np.ndarray:
  """Inverse of `to_keras`."""
  if kind == _CONV:
    return np.transpose(value, (3, 2, 0, 1))
  if kind == _DWCONV:
    return np.transpose(value, (2, 3, 0, 1))
  if kind == _LINEAR:
    return np.transpose(value, (1, 0))
  return value


def torch_shape(keras_shape: Sequence[int], kind: str) -> Tuple[int, ...]:
  """The PyTorch shape of a Keras variable of conversion `kind`."""
  shape = tuple(int(d) for d in keras_shape)
  if kind == _CONV:
    kh, kw, i, o = shape
    return (o, i, kh, kw)
  if kind == _DWCONV:
    kh, kw, c, m = shape
    return (c, m, kh, kw)
  if kind == _LINEAR:
    return (shape[1], shape[0])
  return shape


def _gelu(x: tf.Tensor) -> tf.Tensor:
  """Exact (erf) GELU, as torch.nn.GELU()."""
  return tf.nn.gelu(x, approximate=False)


def _layer_norm(x: tf.Tensor, gamma: tf.Variable, beta: tf.Variable, eps: float) -> tf.Tensor:
  """LayerNorm over the last axis with the biased variance, as torch."""
  mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
  return (x - mean) * tf.math.rsqrt(var + eps) * gamma + beta


class _TorchNamedLayer(tf.keras.layers.Layer):
  """A layer that creates its weights up front and lists them under torch names."""

  def _var(self, name: str, shape: Sequence[int], *, trainable: bool = True,
           init: str = "zeros") -> tf.Variable:
    initializer = {
        "zeros": tf.keras.initializers.Zeros(),
        "ones": tf.keras.initializers.Ones(),
        "normal": tf.keras.initializers.TruncatedNormal(stddev=0.02),
    }[init]
    return self.add_weight(name=name, shape=tuple(shape), dtype=tf.float32,
                           initializer=initializer, trainable=trainable)

  def torch_params(self) -> _TorchParams:
    """Returns (torch name relative to this layer, variable, conversion kind)."""
    raise NotImplementedError

  def _linear(self, name: str, x: tf.Tensor, kernel, bias) -> tf.Tensor:
    """`x @ kernel + bias`, plus the low-rank adapter of `name` if one was added.

    `adapters` maps a linear layer's name (`qkv`, `proj`, `fc1`, `fc2`) to a layer
    computing its additive update from `x` (`tff_sam.models.lora`); empty by default.
    """
    y = tf.matmul(x, kernel) + bias
    adapter = self.adapters.get(name) if hasattr(self, "adapters") else None
    return y if adapter is None else y + adapter(x)


def _prefixed(prefix: str, params: _TorchParams) -> _TorchParams:
  return [(f"{prefix}.{name}", var, kind) for name, var, kind in params]


def _children_params(layer: "_TorchNamedLayer", names: Sequence[str]) -> _TorchParams:
  """The torch params of `layer`'s children `names`, each under its own prefix."""
  return [p for name in names for p in _prefixed(name, getattr(layer, name).torch_params())]


class Conv2dBN(_TorchNamedLayer):
  """Conv2d without bias followed by an inference-mode BatchNorm2d (`Conv2d_BN`)."""

  def __init__(self, in_chans: int, out_chans: int, *, kernel_size: int = 1, stride: int = 1,
               pad: int = 0, depthwise: bool = False, **kwargs):
    super().__init__(**kwargs)
    if depthwise and in_chans != out_chans:
      raise ValueError("a depthwise Conv2d_BN keeps the channel count")
    self.kernel_size, self.stride, self.pad, self.depthwise = kernel_size, stride, pad, depthwise
    shape = ((kernel_size, kernel_size, in_chans, 1) if depthwise else
             (kernel_size, kernel_size, in_chans, out_chans))
    self.kernel = self._var("c.weight", shape, init="normal")
    self.gamma = self._var("bn.weight", (out_chans,), init="ones")
    self.beta = self._var("bn.bias", (out_chans,))
    self.moving_mean = self._var("bn.running_mean", (out_chans,), trainable=False)
    self.moving_var = self._var("bn.running_var", (out_chans,), trainable=False, init="ones")
    self.built = True

  def torch_params(self) -> _TorchParams:
    return [("c.weight", self.kernel, _DWCONV if self.depthwise else _CONV),
            ("bn.weight", self.gamma, _SAME), ("bn.bias", self.beta, _SAME),
            ("bn.running_mean", self.moving_mean, _SAME),
            ("bn.running_var", self.moving_var, _SAME)]

  def call(self, x: tf.Tensor) -> tf.Tensor:
    strides = (1, self.stride, self.stride, 1)
    if self.pad == 0:
      padding = "VALID"
    elif self.stride == 1 and self.pad == (self.kernel_size - 1) // 2:
      padding = "SAME"  # Symmetric padding, identical to torch's at stride 1.
    else:
      p = self.pad
      x = tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]])
      padding = "VALID"
    if self.depthwise:
      y = tf.nn.depthwise_conv2d(x, self.kernel, strides, padding)
    else:
      y = tf.nn.conv2d(x, self.kernel, strides, padding)
    scale = self.gamma * tf.math.rsqrt(self.moving_var + _BN_EPS)
    return y * scale + (self.beta - self.moving_mean * scale)


class PatchEmbed(_TorchNamedLayer):
  """Two stride-2 3x3 Conv2d_BN with a GELU between: (B, S, S, 3) -> (B, S/4, S/4, C)."""

  def __init__(self, in_chans: int, embed_dim: int, **kwargs):
    super().__init__(**kwargs)
    self.conv1 = Conv2dBN(in_chans, embed_dim // 2, kernel_size=3, stride=2, pad=1, name="seq.0")
    self.conv2 = Conv2dBN(embed_dim // 2, embed_dim, kernel_size=3, stride=2, pad=1, name="seq.2")
    self.built = True

  def torch_params(self) -> _TorchParams:
    return _prefixed("seq.0", self.conv1.torch_params()) + _prefixed(
        "seq.2", self.conv2.torch_params())

  def call(self, x: tf.Tensor) -> tf.Tensor:
    return self.conv2(_gelu(self.conv1(x)))


class MBConv(_TorchNamedLayer):
  """Inverted residual block: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU."""

  def __init__(self, chans: int, expand_ratio: float, **kwargs):
    super().__init__(**kwargs)
    hidden = int(chans * expand_ratio)
    self.conv1 = Conv2dBN(chans, hidden, name="conv1")
    self.conv2 = Conv2dBN(hidden, hidden, kernel_size=3, stride=1, pad=1, depthwise=True,
                          name="conv2")
    self.conv3 = Conv2dBN(hidden, chans, name="conv3")
    self.built = True

  def torch_params(self) -> _TorchParams:
    return _children_params(self, ("conv1", "conv2", "conv3"))

  def call(self, x: tf.Tensor) -> tf.Tensor:
    y = _gelu(self.conv1(x))
    y = _gelu(self.conv2(y))
    y = self.conv3(y)
    return _gelu(y + x)


def _merge_stride(out_dim: int) -> int:
  """PatchMerging's stride into a stage of `out_dim` channels.

  MobileSAM keeps the resolution when merging into its last stage (320 channels;
  448/576 for the larger TinyViTs), so the embedding stays at S/16.
  """
  return 1 if out_dim in (320, 448, 576) else 2


def feature_shape(img_size: int, stage: int) -> Tuple[int, int, int]:
  """(height, width, channels) of `TinyViT.features(..., stage=stage)` for one image."""
  side = img_size // 4  # The patch embedding's two stride-2 convolutions.
  for i in range(stage):
    side = (side - 1) // _merge_stride(EMBED_DIMS[i + 1]) + 1  # 3x3, padding 1.
  return (side, side, EMBED_DIMS[stage])


class PatchMerging(_TorchNamedLayer):
  """1x1 conv, 3x3 depthwise (stride 2, or 1 into the 320-channel stage), 1x1 conv."""

  def __init__(self, dim: int, out_dim: int, **kwargs):
    super().__init__(**kwargs)
    self.stride = _merge_stride(out_dim)
    self.conv1 = Conv2dBN(dim, out_dim, name="conv1")
    self.conv2 = Conv2dBN(out_dim, out_dim, kernel_size=3, stride=self.stride, pad=1,
                          depthwise=True, name="conv2")
    self.conv3 = Conv2dBN(out_dim, out_dim, name="conv3")
    self.built = True

  def torch_params(self) -> _TorchParams:
    return _children_params(self, ("conv1", "conv2", "conv3"))

  def call(self, x: tf.Tensor) -> tf.Tensor:
    x = _gelu(self.conv1(x))
    x = _gelu(self.conv2(x))
    return self.conv3(x)


class Attention(_TorchNamedLayer):
  """LeViT-style attention on (B', N, C) windows with learned relative-offset biases."""

  def __init__(self, dim: int, key_dim: int, num_heads: int, resolution: int, **kwargs):
    super().__init__(**kwargs)
    self.num_heads, self.key_dim = num_heads, key_dim
    self.d = key_dim  # attn_ratio = 1 in TinyViT blocks.
    self.dh = self.d * num_heads
    self.scale = key_dim**-0.5
    points = list(itertools.product(range(resolution), range(resolution)))
    offsets: Dict[Tuple[int, int], int] = {}
    idxs = []
    for p1 in points:
      for p2 in points:
        off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
        idxs.append(offsets.setdefault(off, len(offsets)))
    n = len(points)
    self._bias_idxs = np.asarray(idxs, dtype=np.int32).reshape(n, n)
    self.norm_gamma = self._var("norm.weight", (dim,), init="ones")
    self.norm_beta = self._var("norm.bias", (dim,))
    qkv_out = self.dh + 2 * key_dim * num_heads
    self.qkv_kernel = self._var("qkv.weight", (dim, qkv_out), init="normal")
    self.qkv_bias = self._var("qkv.bias", (qkv_out,))
    self.proj_kernel = self._var("proj.weight", (self.dh, dim), init="normal")
    self.proj_bias = self._var("proj.bias", (dim,))
    self.attention_biases = self._var("attention_biases", (num_heads, len(offsets)))
    self.adapters = {}  # LoRA on `qkv`/`proj` (`tff_sam.models.lora`).
    self.built = True

  def torch_params(self) -> _TorchParams:
    return [("attention_biases", self.attention_biases, _SAME),
            ("norm.weight", self.norm_gamma, _SAME), ("norm.bias", self.norm_beta, _SAME),
            ("qkv.weight", self.qkv_kernel, _LINEAR), ("qkv.bias", self.qkv_bias, _SAME),
            ("proj.weight", self.proj_kernel, _LINEAR), ("proj.bias", self.proj_bias, _SAME)]

  def call(self, x: tf.Tensor) -> tf.Tensor:
    b = tf.shape(x)[0]
    n = x.shape[1]
    x = _layer_norm(x, self.norm_gamma, self.norm_beta, _LN_EPS)
    qkv = self._linear("qkv", x, self.qkv_kernel, self.qkv_bias)
    # torch: view(B, N, heads, -1).split([key_dim, key_dim, d], dim=3): per-head q|k|v.
    qkv = tf.reshape(qkv, [b, n, self.num_heads, 2 * self.key_dim + self.d])
    q, k, v = tf.split(qkv, [self.key_dim, self.key_dim, self.d], axis=3)
    q = tf.transpose(q, [0, 2, 1, 3])
    k = tf.transpose(k, [0, 2, 1, 3])
    v = tf.transpose(v, [0, 2, 1, 3])
    bias = tf.gather(self.attention_biases, self._bias_idxs, axis=1)  # (heads, N, N)
    attn = tf.matmul(q, k, transpose_b=True) * self.scale + bias
    attn = tf.nn.softmax(attn, axis=-1)
    out = tf.transpose(tf.matmul(attn, v), [0, 2, 1, 3])
    out = tf.reshape(out, [b, n, self.dh])
    return self._linear("proj", out, self.proj_kernel, self.proj_bias)


class Mlp(_TorchNamedLayer):
  """LayerNorm, Linear, GELU, Linear."""

  def __init__(self, dim: int, hidden: int, **kwargs):
    super().__init__(**kwargs)
    self.norm_gamma = self._var("norm.weight", (dim,), init="ones")
    self.norm_beta = self._var("norm.bias", (dim,))
    self.fc1_kernel = self._var("fc1.weight", (dim, hidden), init="normal")
    self.fc1_bias = self._var("fc1.bias", (hidden,))
    self.fc2_kernel = self._var("fc2.weight", (hidden, dim), init="normal")
    self.fc2_bias = self._var("fc2.bias", (dim,))
    self.adapters = {}  # LoRA on `fc1`/`fc2` (`tff_sam.models.lora`).
    self.built = True

  def torch_params(self) -> _TorchParams:
    return [("norm.weight", self.norm_gamma, _SAME), ("norm.bias", self.norm_beta, _SAME),
            ("fc1.weight", self.fc1_kernel, _LINEAR), ("fc1.bias", self.fc1_bias, _SAME),
            ("fc2.weight", self.fc2_kernel, _LINEAR), ("fc2.bias", self.fc2_bias, _SAME)]

  def call(self, x: tf.Tensor) -> tf.Tensor:
    x = _layer_norm(x, self.norm_gamma, self.norm_beta, _LN_EPS)
    x = _gelu(self._linear("fc1", x, self.fc1_kernel, self.fc1_bias))
    return self._linear("fc2", x, self.fc2_kernel, self.fc2_bias)


class TinyViTBlock(_TorchNamedLayer):
  """Window attention (zero-padded to whole windows), 3x3 depthwise conv, MLP."""

  def __init__(self, dim: int, num_heads: int, window_size: int, **kwargs):
    super().__init__(**kwargs)
    self.window_size = window_size
    self.attn = Attention(dim, dim // num_heads, num_heads, window_size, name="attn")
    self.mlp = Mlp(dim, int(dim * MLP_RATIO), name="mlp")
    self.local_conv = Conv2dBN(dim, dim, kernel_size=LOCAL_CONV_SIZE, stride=1,
                               pad=LOCAL_CONV_SIZE // 2, depthwise=True, name="local_conv")
    self.built = True

  def torch_params(self) -> _TorchParams:
    return (_prefixed("attn", self.attn.torch_params()) +
            _prefixed("mlp", self.mlp.torch_params()) +
            _prefixed("local_conv", self.local_conv.torch_params()))

  def _window_attention(self, x: tf.Tensor) -> tf.Tensor:
    b = tf.shape(x)[0]
    _, h, w, c = x.shape
    ws = self.window_size
    if h == ws and w == ws:
      return tf.reshape(self.attn(tf.reshape(x, [b, h * w, c])), [b, h, w, c])
    pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
    if pad_b or pad_r:
      # Zero tokens are padded in before the attention's LayerNorm, as in the reference.
      x = tf.pad(x, [[0, 0], [0, pad_b], [0, pad_r], [0, 0]])
    ph, pw = h + pad_b, w + pad_r
    nh, nw = ph // ws, pw // ws
    x = tf.reshape(x, [b, nh, ws, nw, ws, c])
    x = tf.reshape(tf.transpose(x, [0, 1, 3, 2, 4, 5]), [b * nh * nw, ws * ws, c])
    x = self.attn(x)
    x = tf.reshape(x, [b, nh, nw, ws, ws, c])
    x = tf.reshape(tf.transpose(x, [0, 1, 3, 2, 4, 5]), [b, ph, pw, c])
    if pad_b or pad_r:
      x = x[:, :h, :w, :]
    return x

  def call(self, x: tf.Tensor) -> tf.Tensor:
    x = x + self._window_attention(x)
    x = self.local_conv(x)
    return x + self.mlp(x)


class _Stage(_TorchNamedLayer):
  """`ConvLayer` (stage 0) or `BasicLayer`: blocks, then an optional PatchMerging."""

  def __init__(self, blocks: Sequence[_TorchNamedLayer],
               downsample: Optional[PatchMerging], **kwargs):
    super().__init__(**kwargs)
    self.blocks = list(blocks)
    self.downsample = downsample
    self.built = True

  def torch_params(self) -> _TorchParams:
    params: _TorchParams = []
    for i, block in enumerate(self.blocks):
      params += _prefixed(f"blocks.{i}", block.torch_params())
    if self.downsample is not None:
      params += _prefixed("downsample", self.downsample.torch_params())
    return params

  def call(self, x: tf.Tensor) -> tf.Tensor:
    for block in self.blocks:
      x = block(x)
    if self.downsample is not None:
      x = self.downsample(x)
    return x


class Neck(_TorchNamedLayer):
  """1x1 conv to 256, LayerNorm2d, 3x3 conv, LayerNorm2d (no conv biases)."""

  def __init__(self, in_chans: int, out_chans: int, **kwargs):
    super().__init__(**kwargs)
    self.conv1 = self._var("0.weight", (1, 1, in_chans, out_chans), init="normal")
    self.ln1_gamma = self._var("1.weight", (out_chans,), init="ones")
    self.ln1_beta = self._var("1.bias", (out_chans,))
    self.conv2 = self._var("2.weight", (3, 3, out_chans, out_chans), init="normal")
    self.ln2_gamma = self._var("3.weight", (out_chans,), init="ones")
    self.ln2_beta = self._var("3.bias", (out_chans,))
    self.built = True

  def torch_params(self) -> _TorchParams:
    return [("0.weight", self.conv1, _CONV), ("1.weight", self.ln1_gamma, _SAME),
            ("1.bias", self.ln1_beta, _SAME), ("2.weight", self.conv2, _CONV),
            ("3.weight", self.ln2_gamma, _SAME), ("3.bias", self.ln2_beta, _SAME)]

  def call(self, x: tf.Tensor) -> tf.Tensor:
    x = tf.nn.conv2d(x, self.conv1, 1, "VALID")
    x = _layer_norm(x, self.ln1_gamma, self.ln1_beta, _LN2D_EPS)
    x = tf.nn.conv2d(x, self.conv2, 1, "SAME")
    return _layer_norm(x, self.ln2_gamma, self.ln2_beta, _LN2D_EPS)


class TinyViT(tf.keras.Model):
  """MobileSAM's TinyViT-5M image encoder with its neck (inference only).

  Call it (eagerly or inside a `tf.function`) on (B, 3, S, S) pixel values, or use
  `get_image_embeddings`, which runs a cached `tf.function`.
  """

  def __init__(self, img_size: int = 1024, **kwargs):
    kwargs.setdefault("name", "tinyvit")
    super().__init__(**kwargs)
    if img_size <= 0 or img_size % 16:
      raise ValueError(f"img_size must be a positive multiple of 16, got {img_size}")
    self.img_size = img_size
    self.patch_embed = PatchEmbed(3, EMBED_DIMS[0], name="patch_embed")
    stages = []
    for i, dim in enumerate(EMBED_DIMS):
      out_dim = EMBED_DIMS[min(i + 1, len(EMBED_DIMS) - 1)]
      downsample = (PatchMerging(dim, out_dim, name=f"layers.{i}.downsample")
                    if i < len(EMBED_DIMS) - 1 else None)
      if i == 0:
        blocks = [MBConv(dim, MBCONV_EXPAND_RATIO, name=f"layers.{i}.blocks.{j}")
                  for j in range(DEPTHS[i])]
      else:
        blocks = [TinyViTBlock(dim, NUM_HEADS[i], WINDOW_SIZES[i], name=f"layers.{i}.blocks.{j}")
                  for j in range(DEPTHS[i])]
      stages.append(_Stage(blocks, downsample, name=f"layers.{i}"))
    self.stages = stages
    self.neck = Neck(EMBED_DIMS[-1], NECK_CHANNELS, name="neck")
    self._embed_fn = None
    self.built = True

  def torch_params(self) -> _TorchParams:
    """Returns (MobileSAM state-dict key without `image_encoder.`, variable, kind)."""
    params = _prefixed("patch_embed", self.patch_embed.torch_params())
    for i, stage in enumerate(self.stages):
      params += _prefixed(f"layers.{i}", stage.torch_params())
    return params + _prefixed("neck", self.neck.torch_params())

  def features(self, pixel_values: tf.Tensor, *, stage: int) -> tf.Tensor:
    """The channels-last input of stage `stage` (0: the patch embedding's output)."""
    x = tf.transpose(tf.convert_to_tensor(pixel_values, tf.float32), [0, 2, 3, 1])
    x = self.patch_embed(x)
    for s in self.stages[:stage]:
      x = s(x)
    return x

  def from_features(self, x: tf.Tensor, *, stage: int) -> tf.Tensor:
    """The embeddings (B, 256, S/16, S/16) from `features(..., stage=stage)`."""
    for s in self.stages[stage:]:
      x = s(x)
    x = self.neck(x)
    return tf.transpose(x, [0, 3, 1, 2])

  def call(self, pixel_values: tf.Tensor,
           training: bool = False) -> tf.Tensor:  # pylint: disable=unused-argument
    return self.from_features(self.features(pixel_values, stage=0), stage=0)

  def get_image_embeddings(self, pixel_values: Union[np.ndarray, tf.Tensor]) -> tf.Tensor:
    """Embeds (B, 3, S, S) pixel values into (B, 256, S/16, S/16) with a compiled graph."""
    if self._embed_fn is None:
      spec = tf.TensorSpec([None, 3, self.img_size, self.img_size], tf.float32)
      self._embed_fn = tf.function(self.call, input_signature=[spec], autograph=False)
    return self._embed_fn(tf.convert_to_tensor(pixel_values, tf.float32))


def build_tinyvit(img_size: int = 1024) -> TinyViT:
  """Builds MobileSAM's TinyViT encoder with all weights created (randomly initialized).

  Args:
    img_size: Square input side; 1024 for MobileSAM. Any positive multiple of 16 works
      (smaller sizes are useful for tests); the output side is `img_size // 16`.

  Returns:
    The built model.
  """
  return TinyViT(img_size=img_size)
