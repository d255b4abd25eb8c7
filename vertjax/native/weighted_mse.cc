// The batch-mean weighted squared error of vertjax/losses.py and its gradient
// in one sweep over the [B, H, W, K] arrays: each pixel's K values are read
// once, the gradient is written and the value accumulated in the same loop.
// XLA:CPU needs two sweeps for this (it does not fuse a reduction with an
// elementwise output), hence this kernel; losses.py stays the definition.
//
// Inputs: predictions, targets [B, H, W, K] f32; base [B, K] f32 (the weight
// of a layer's non-hot pixels: rules 2, 3 and else); coef [B] f32 (each
// example's share of the batch mean, 0 for padding). Attributes: hot_weight
// (rule 1's weight), over_all_layers (rule 1 tests max_k y, as l3 does).
// Outputs: the value sum_b coef_b * loss_b [] f32 and its gradient with
// respect to the predictions [B, H, W, K] f32.

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kHotThreshold = 0.5f;

struct Args {
  const float* predictions;
  const float* targets;
  const float* base;
  const float* coef;
  float* grad;
  int64_t height, width, layers;
  float hot_weight, scale;  // scale = 2 / (H * W * K)
  bool over_all_layers;
};

// Each function sweeps rows [first, last) of the flattened B * H row axis;
// `sums[b]` receives the unscaled sum_i w * (p - y)^2 of example b over them.
// A row of the [B, H, W, K] arrays is W * K contiguous floats. Sums run in
// float per lane or per layer (vertical sums, which the compiler vectorises
// without reordering any addition) and are added in double once per row.

// Rule 1 on each element (mse, l1, l2): the row as one flat run, in blocks
// of kLanes. The cold weights are the example's K base weights repeated W
// times (`tiled`, built once per example).
constexpr int64_t kLanes = 16;

void SweepRowsByElement(const Args& a, int64_t first, int64_t last, double* sums) {
  const int64_t K = a.layers, n = a.width * K;
  std::vector<float> tiled(n);
  int64_t tiled_for = -1;
  for (int64_t row = first; row < last; ++row) {
    const int64_t b = row / a.height;
    if (b != tiled_for) {
      for (int64_t j = 0; j < n; ++j) tiled[j] = a.base[b * K + j % K];
      tiled_for = b;
    }
    const float c = a.scale * a.coef[b], hot_weight = a.hot_weight;
    const float* __restrict p = a.predictions + row * n;
    const float* __restrict y = a.targets + row * n;
    const float* __restrict cold = tiled.data();
    float* __restrict g = a.grad + row * n;
    float acc[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const float d = p[j + l] - y[j + l];
        const float w = y[j + l] >= kHotThreshold ? hot_weight : cold[j + l];
        acc[l] += w * d * d;
        g[j + l] = c * w * d;
      }
    }
    double row_sum = 0.0;
    for (; j < n; ++j) {
      const float d = p[j] - y[j];
      const float w = y[j] >= kHotThreshold ? hot_weight : cold[j];
      row_sum += w * d * d;
      g[j] = c * w * d;
    }
    for (int64_t l = 0; l < kLanes; ++l) row_sum += acc[l];
    sums[b] += row_sum;
  }
}

// Rule 1 on each pixel's maximum over the layers (l3): pixel by pixel, one
// accumulator per layer, in local arrays (so that the compiler keeps them
// apart from the gradient it writes). kFixedLayers > 0 fixes K at compile
// time (13, the vertebrae T4..L4), 0 reads it at run time.
constexpr int kMaxLayers = 64;

template <int kFixedLayers>
void SweepRowsByPixel(const Args& a, int64_t first, int64_t last, double* sums) {
  const int K = kFixedLayers > 0 ? kFixedLayers : static_cast<int>(a.layers);
  // Locals, not a's fields: the gradient stores could alias those.
  const int64_t width = a.width;
  const float hot_weight = a.hot_weight;
  for (int64_t row = first; row < last; ++row) {
    const int64_t b = row / a.height;
    const float* base = a.base + b * K;
    const float c = a.scale * a.coef[b];
    const int64_t offset = row * width * K;
    const float* p = a.predictions + offset;
    const float* y = a.targets + offset;
    float* g = a.grad + offset;
    constexpr int kSize = kFixedLayers > 0 ? kFixedLayers : kMaxLayers;
    float acc[kSize] = {};
    for (int64_t x = 0; x < width; ++x, p += K, y += K, g += K) {
      float w[kSize];
      float peak = y[0];
      for (int k = 1; k < K; ++k) peak = y[k] > peak ? y[k] : peak;
      const bool hot = peak >= kHotThreshold;
      for (int k = 0; k < K; ++k) w[k] = hot ? hot_weight : base[k];
      for (int k = 0; k < K; ++k) {
        const float d = p[k] - y[k];
        acc[k] += w[k] * d * d;
        g[k] = c * w[k] * d;
      }
    }
    double row_sum = 0.0;
    for (int k = 0; k < K; ++k) row_sum += acc[k];
    sums[b] += row_sum;
  }
}

ffi::Error WeightedMseImpl(ffi::Buffer<ffi::F32> predictions, ffi::Buffer<ffi::F32> targets,
                           ffi::Buffer<ffi::F32> base, ffi::Buffer<ffi::F32> coef,
                           ffi::ResultBuffer<ffi::F32> value, ffi::ResultBuffer<ffi::F32> grad,
                           float hot_weight, bool over_all_layers) {
  const auto dims = predictions.dimensions();
  if (dims.size() != 4 || targets.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("predictions and targets must be [B, H, W, K]");
  }
  const int64_t B = dims[0], H = dims[1], W = dims[2], K = dims[3];
  for (int i = 0; i < 4; ++i) {
    if (targets.dimensions()[i] != dims[i]) {
      return ffi::Error::InvalidArgument("predictions and targets differ in shape");
    }
  }
  if (base.element_count() != B * K || coef.element_count() != B) {
    return ffi::Error::InvalidArgument("base must be [B, K] and coef [B]");
  }
  if (K > kMaxLayers) {
    return ffi::Error::InvalidArgument("at most 64 layers (K)");
  }
  const double count = static_cast<double>(H) * W * K;
  Args args{predictions.typed_data(), targets.typed_data(), base.typed_data(),
            coef.typed_data(), grad->typed_data(), H, W, K, hot_weight,
            static_cast<float>(2.0 / count), over_all_layers};

  const int64_t rows = B * H;
  const int64_t threads = std::clamp<int64_t>(
      std::min<int64_t>(std::thread::hardware_concurrency(), rows / 64), 1, 64);
  std::vector<double> sums(threads * B, 0.0);
  auto sweep = [&](int64_t t) {
    const int64_t first = rows * t / threads, last = rows * (t + 1) / threads;
    double* out = sums.data() + t * B;
    if (!over_all_layers) {
      SweepRowsByElement(args, first, last, out);
    } else if (K == 13) {
      SweepRowsByPixel<13>(args, first, last, out);
    } else {
      SweepRowsByPixel<0>(args, first, last, out);
    }
  };
  // Every share gets a thread of its own: a share run on XLA's calling
  // thread took l3 30-50 % longer (benchmarks/RESULTS.md).
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < threads; ++t) pool.emplace_back(sweep, t);
  for (auto& thread : pool) thread.join();

  double total = 0.0;
  for (int64_t t = 0; t < threads; ++t) {
    for (int64_t b = 0; b < B; ++b) total += coef.typed_data()[b] * sums[t * B + b];
  }
  value->typed_data()[0] = static_cast<float>(total / count);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VertjaxWeightedMse, WeightedMseImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // predictions
                                  .Arg<ffi::Buffer<ffi::F32>>()  // targets
                                  .Arg<ffi::Buffer<ffi::F32>>()  // base
                                  .Arg<ffi::Buffer<ffi::F32>>()  // coef
                                  .Ret<ffi::Buffer<ffi::F32>>()  // value
                                  .Ret<ffi::Buffer<ffi::F32>>()  // gradient
                                  .Attr<float>("hot_weight")
                                  .Attr<bool>("over_all_layers"));
