"""BatchNorm that trains with bf16/fp16 parameters beside fp32 running statistics.

DeepSpeed casts a model's parameters to the training dtype and leaves its buffers as they are,
and torch's batch_norm takes a low-precision input with fp32 parameters and statistics, or all
in one dtype, but not bf16 parameters beside fp32 statistics. These layers cast the affine
parameters up to the statistics' dtype for the call (their gradients flow back in the
parameters' dtype); in fp32 nothing differs from the plain module, and parameter and buffer names
are the plain module's, so checkpoints and exports do not see the difference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Fp32StatisticsBatchNorm:
    """A BatchNorm whose parameters may be in bf16/fp16 while its running statistics stay fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = self.running_mean
        if self.weight is None or stats is None or self.weight.dtype == stats.dtype:
            return super().forward(x)
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average
                momentum = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(x, stats, self.running_var, self.weight.to(stats.dtype), self.bias.to(stats.dtype),
                            self.training, momentum, self.eps)


class BatchNorm1dFp32Statistics(Fp32StatisticsBatchNorm, nn.BatchNorm1d):
    pass


class BatchNorm2dFp32Statistics(Fp32StatisticsBatchNorm, nn.BatchNorm2d):
    pass


class BatchNorm3dFp32Statistics(Fp32StatisticsBatchNorm, nn.BatchNorm3d):
    pass


_FP32_STATISTICS = {nn.BatchNorm1d: BatchNorm1dFp32Statistics, nn.BatchNorm2d: BatchNorm2dFp32Statistics,
                    nn.BatchNorm3d: BatchNorm3dFp32Statistics}


def keep_batchnorm_statistics_fp32(module: nn.Module) -> None:
    """Every plain BatchNorm of `module` (open_clip's ResNet towers') becomes its fp32-statistics
    twin, in place; subclasses, ours included, are left as they are."""
    for child in module.modules():
        if type(child) in _FP32_STATISTICS:
            child.__class__ = _FP32_STATISTICS[type(child)]
