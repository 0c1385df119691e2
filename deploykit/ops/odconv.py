"""ODConv's export contract: the shared ``deploykit::DynamicConv2d`` node for the kernel and spatial attentions;
the input (channel) and output (filter) attentions are plain Mul nodes around it.

Reference (paper Eq. 4): y = (a_w1 * a_f1 * a_c1 * a_s1 * W_1 + ... + a_wn * a_fn * a_cn * a_sn * W_n) * x, with
the four attentions from one GAP -> FC -> BN -> ReLU trunk; sigmoid(z / T) for the channel, filter and spatial
heads, softmax(z / T) over kernels.
"""

from __future__ import annotations

import numpy as np
from torch import nn

from deploykit.nn.odconv import ODConv2d
from deploykit.ops import reference as ref
from deploykit.ops.dynamic_conv2d import DYNAMIC_CONV2D, dynamic_conv2d_reference
from deploykit.ops.spec import LayerRule, VariantSpec, attribute, square


def odconv_reference(module: ODConv2d, x: np.ndarray) -> np.ndarray:
    """Float64 ODConv2d forward (inference-mode attention BatchNorm) at the module's temperature."""
    x = x.astype(np.float64)
    attention, t = module.attention, module.attention.temperature
    bn = attention.bn
    z = ref.linear(x.mean(axis=(2, 3)), ref.array(attention.fc.weight))
    z = (z - ref.array(bn.running_mean)) / np.sqrt(ref.array(bn.running_var) + bn.eps) * ref.array(bn.weight) \
        + ref.array(bn.bias)
    z = np.maximum(z, 0)

    def head(conv):
        return None if conv is None else ref.linear(z, ref.array(conv.weight), ref.array(conv.bias)) / t

    channel, filt, spatial, kernel = (head(attention.channel_fc), head(attention.filter_fc),
                                      head(attention.spatial_fc), head(attention.kernel_fc))
    batch, k = x.shape[0], module.kernel_size
    kernel_weights = np.ones((batch, 1)) if kernel is None else ref.softmax(kernel, axis=1)
    taps = np.ones((1, k, k)) if spatial is None else ref.sigmoid(spatial).reshape(batch, k, k)
    bank = ref.array(module.weight)
    y = dynamic_conv2d_reference(x * ref.sigmoid(channel)[:, :, None, None], bank, kernel_weights,
                                 np.zeros(bank.shape[:2]), taps, (module.stride,) * 2, [module.padding] * 4,
                                 (module.dilation,) * 2, module.groups)
    return y if filt is None else y * ref.sigmoid(filt)[:, :, None, None]


def odconv_from_official(layer: nn.Module) -> ODConv2d:
    """OSVAI's ``ODConv2d``. Its reduction is not stored, so the attention width is read from ``attention.fc``
    (a reduction of (width + 0.5) / in_planes gives it back); ``attention.temperature`` is not in the state_dict
    (1 when fresh, annealed from 30 in training), so it is carried over."""
    attention = attribute(layer, "attention")
    in_planes = attribute(layer, "in_planes")
    width = attribute(attribute(attention, "fc"), "out_channels")
    module = ODConv2d(in_planes, attribute(layer, "out_planes"), square(layer, "kernel_size"),
                      square(layer, "stride"), square(layer, "padding"), square(layer, "dilation"),
                      attribute(layer, "groups"), reduction=(width + 0.5) / in_planes,
                      kernel_num=attribute(layer, "kernel_num"))
    module.update_temperature(attribute(attention, "temperature"))
    return module


SPEC = VariantSpec(name="odconv", module=ODConv2d, reference=odconv_reference, tolerance={"float32": 1e-4},
                   custom_ops=(DYNAMIC_CONV2D,),
                   conversions=(LayerRule(("ODConv2d",), ODConv2d, odconv_from_official),))
