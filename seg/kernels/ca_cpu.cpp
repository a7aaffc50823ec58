// Coordinate Attention's two full-size steps for CPU inference, one pass over the map each.
//
// PyTorch needs two passes to pool (x.mean(3), x.mean(2)) and two to gate (x * a_h, then * a_w),
// and each pass over an early MobileNetV2 map (96 x 256 x 256 floats, 25 MB) runs from memory,
// not cache. Here one (n, c) plane is pooled, or gated, while it is in cache: one read to pool,
// one read and one write to gate. Planes are independent, so they are split across threads.
// forward_project goes further for MobileNetV2's blocks: the gate is applied inside the next 1x1
// conv, tile by tile, so the gated map is never written out.
//
// Built on first use by seg/kernels/cpu.py. Float32, NCHW-contiguous only; the caller checks.

// Per-operator ATen headers and torch's pybind casters, not <torch/extension.h>: the whole C++
// API it pulls in took 16 s of a 23 s build to parse (3 s now).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

void check(const at::Tensor& x, const char* name, int64_t dim) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == dim,
              name, " must be a contiguous float32 CPU tensor with ", dim, " dims");
}

// Called before writing through a raw pointer, so that the write shows as PyTorch's own in-place
// ops show it: the version counter moves (autograd and caches keyed on it see the change), and an
// inference tensor outside inference mode is refused with PyTorch's error, before any write.
void will_write(const at::Tensor& out) { out.unsafeGetTensorImpl()->bump_version(); }

// Items (planes, or rows of a map) of `size` floats per parallel task: enough work per task that
// the thread hand-off stays negligible.
int64_t grain(int64_t size) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(size, 1)); }

// *v, or with kRelu6 min(max(*v, 0), 6) written back to *v: MobileNetV2's in-place ReLU6 done
// by the pooling pass, which saves the ReLU6's own pass over the map.
template <bool kRelu6>
inline float take(float* v) {
  if constexpr (kRelu6) {
    *v = std::min(std::max(*v, 0.0f), 6.0f);
  }
  return *v;
}

// Row means into mean_h[p * stride_h + i] and column means into mean_w[p * stride_w + j] for every
// plane p of x, reading x once (with kRelu6, clamping it in place first; see take).
template <bool kRelu6>
void pool(const at::Tensor& x, float* mean_h, int64_t stride_h, float* mean_w, int64_t stride_w) {
  const int64_t h = x.size(2), w = x.size(3);
  float* src = x.data_ptr<float>();
  const float inv_w = 1.0f / static_cast<float>(w), inv_h = 1.0f / static_cast<float>(h);
  at::parallel_for(0, x.size(0) * x.size(1), grain(h * w), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* plane = src + p * h * w;
      float* col = mean_w + p * stride_w;
      std::fill(col, col + w, 0.0f);
      int64_t i = 0;
      // Four rows per sweep: the column sums are loaded and stored once per four rows.
      for (; i + 4 <= h; i += 4) {
        float* r0 = plane + i * w;
        float* r1 = r0 + w;
        float* r2 = r1 + w;
        float* r3 = r2 + w;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t j = 0; j < w; ++j) {
          const float v0 = take<kRelu6>(r0 + j), v1 = take<kRelu6>(r1 + j), v2 = take<kRelu6>(r2 + j),
                      v3 = take<kRelu6>(r3 + j);
          s0 += v0;
          s1 += v1;
          s2 += v2;
          s3 += v3;
          col[j] += (v0 + v1) + (v2 + v3);
        }
        mean_h[p * stride_h + i] = s0 * inv_w;
        mean_h[p * stride_h + i + 1] = s1 * inv_w;
        mean_h[p * stride_h + i + 2] = s2 * inv_w;
        mean_h[p * stride_h + i + 3] = s3 * inv_w;
      }
      for (; i < h; ++i) {
        float* row = plane + i * w;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < w; ++j) {
          const float v = take<kRelu6>(row + j);
          sum += v;
          col[j] += v;
        }
        mean_h[p * stride_h + i] = sum * inv_w;
      }
      for (int64_t j = 0; j < w; ++j) col[j] *= inv_h;
    }
  });
}

// pool<relu6>, with the in-place clamp announced to PyTorch first (see will_write).
void pool(const at::Tensor& x, float* mean_h, int64_t stride_h, float* mean_w, int64_t stride_w, bool relu6) {
  if (relu6) {
    will_write(x);
    pool<true>(x, mean_h, stride_h, mean_w, stride_w);
  } else {
    pool<false>(x, mean_h, stride_h, mean_w, stride_w);
  }
}

// out = x * a_h[..., None] * a_w[..., None, :] (out may be x), with strips read at a stride.
// Same op order as PyTorch's ``x * a_h * a_w``, so the results are bit-identical.
void apply_gate(const at::Tensor& x, const float* a_h, int64_t stride_h, const float* a_w, int64_t stride_w,
                at::Tensor& out) {
  const int64_t h = x.size(2), w = x.size(3);
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, x.size(0) * x.size(1), grain(h * w), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* gw = a_w + p * stride_w;
      for (int64_t i = 0; i < h; ++i) {
        const float* row = src + (p * h + i) * w;
        float* row_out = dst + (p * h + i) * w;
        const float gh = a_h[p * stride_h + i];
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) row_out[j] = (row[j] * gh) * gw[j];
      }
    }
  });
}

// Bytes of gated map per tile in forward_project: small enough to stay in a core's L2 cache
// (1-2 MiB on current x86 server cores) while the matmul reads it, large enough that the
// matmul's columns (rows x W) keep it efficient.
constexpr int64_t kTileBytes = 512 * 1024;

// This thread's scratch buffer of at least `size` floats. Kept between calls: a fresh 512 KiB
// buffer per call would be mmap'ed, zero-filled and page-faulted in again every time.
float* scratch(int64_t size) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

// c (m x n, row stride ldc) = a (m x k) @ b (k x n), all row-major, through torch's own matmul
// (MKL or its other BLAS). Called from inside parallel_for, where it runs on one thread. The
// views are built from raw pointers, as plain tensors: the caller's may be inference tensors,
// and the worker threads are not in inference mode.
void matmul(int64_t m, int64_t n, int64_t k, const float* a, const float* b, float* c, int64_t ldc) {
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, at::kFloat);
  at::mm_out(out, at::from_blob(const_cast<float*>(a), {m, k}, at::kFloat),
             at::from_blob(const_cast<float*>(b), {k, n}, at::kFloat));
}

}  // namespace

// Row means (N, C, H) and column means (N, C, W) of x (N, C, H, W), reading x once; with relu6,
// of min(max(x, 0), 6), which is also written back into x.
std::vector<at::Tensor> strip_means(const at::Tensor& x, bool relu6) {
  check(x, "x", 4);
  at::Tensor mean_h = at::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  at::Tensor mean_w = at::empty({x.size(0), x.size(1), x.size(3)}, x.options());
  pool(x, mean_h.data_ptr<float>(), x.size(2), mean_w.data_ptr<float>(), x.size(3), relu6);
  return {mean_h, mean_w};
}

// x * a_h[..., None] * a_w[..., None, :] for strips a_h (N, C, H) and a_w (N, C, W), into out
// (which may be x itself).
at::Tensor gate(const at::Tensor& x, const at::Tensor& a_h, const at::Tensor& a_w, at::Tensor out) {
  check(x, "x", 4);
  check(a_h, "a_h", 3);
  check(a_w, "a_w", 3);
  check(out, "out", 4);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(a_h.size(0) == n && a_h.size(1) == c && a_h.size(2) == h, "a_h must be (N, C, H)");
  TORCH_CHECK(a_w.size(0) == n && a_w.size(1) == c && a_w.size(2) == w, "a_w must be (N, C, W)");
  TORCH_CHECK(out.sizes() == x.sizes(), "out must have x's shape");
  will_write(out);
  apply_gate(x, a_h.data_ptr<float>(), h, a_w.data_ptr<float>(), w, out);
  return out;
}

// CA's gates at inference: a_h (N, C, H) and a_w (N, C, W) from the map x (N, C, H, W).
// params are the block's tensors in CoordAttention._fold_sources() order: conv1 weight (K, C, 1, 1)
// and bias, bn1 weight, bias, running mean and running variance, conv_h weight (C, K, 1, 1) and
// bias, conv_w weight and bias. BN is applied from its running statistics to the (K, H + W) conv1
// output, a few hundred values, instead of being folded into conv1's (K, C) weight: no folded
// copy to cache, nothing to invalidate when the weights change.
std::pair<at::Tensor, at::Tensor> gates(const at::Tensor& x, const std::vector<at::Tensor>& params, double eps,
                                        bool relu6) {
  check(x, "x", 4);
  TORCH_CHECK(params.size() == 10, "CA takes 10 parameter tensors, got ", params.size());
  std::vector<at::Tensor> p;
  for (const at::Tensor& t : params) {
    p.push_back(t.contiguous());  // a no-op for parameters, which are contiguous
    check(p.back(), "every CA parameter", t.dim());
  }
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const at::Tensor w1 = p[0].flatten(1), wh = p[6].flatten(1), ww = p[8].flatten(1);
  const int64_t k = w1.size(0);
  TORCH_CHECK(w1.size(1) == c && wh.size(0) == c && wh.size(1) == k && wh.sizes() == ww.sizes(),
              "CA weights do not fit ", c, " channels");
  const float *gamma = p[2].data_ptr<float>(), *beta = p[3].data_ptr<float>(), *mean = p[4].data_ptr<float>(),
              *var = p[5].data_ptr<float>();
  // Each plane's strips side by side, [H row means | W column means]: conv1 then acts on both
  // with one matmul, as the reference's conv1 on cat([x_h, x_w]) does.
  at::Tensor pooled = at::empty({n, c, h + w}, x.options());
  float* strips = pooled.data_ptr<float>();
  pool(x, strips, h + w, strips + h, h + w, relu6);
  at::Tensor a_h = at::empty({n, c, h}, x.options());
  at::Tensor a_w = at::empty({n, c, w}, x.options());
  const at::Tensor b1 = p[1].unsqueeze(1), bh = p[7].unsqueeze(1), bw = p[9].unsqueeze(1);
  for (int64_t i = 0; i < n; ++i) {
    at::Tensor y = at::addmm(b1, w1, pooled[i]);  // (K, H + W)
    float* row = y.data_ptr<float>();
    for (int64_t r = 0; r < k; ++r, row += h + w) {
      // BN at eval as PyTorch computes it, then hard-swish: v * relu6(v + 3) / 6.
      const float scale = gamma[r] * (1.0f / std::sqrt(var[r] + static_cast<float>(eps)));
      const float shift = beta[r] - mean[r] * scale;
      for (int64_t j = 0; j < h + w; ++j) {
        const float v = row[j] * scale + shift;
        row[j] = v * std::min(std::max(v + 3.0f, 0.0f), 6.0f) / 6.0f;
      }
    }
    at::Tensor a_h_i = a_h[i], a_w_i = a_w[i];
    at::addmm_out(a_h_i, bh, wh, y.narrow(1, 0, h));
    at::addmm_out(a_w_i, bw, ww, y.narrow(1, h, w));
  }
  a_h.sigmoid_();
  a_w.sigmoid_();
  return {a_h, a_w};
}

// The whole CA block at inference, into out (which may be x): one call instead of a dozen small
// Python-dispatched ops, and the small matmuls go straight to addmm on 2-D slices.
at::Tensor forward(const at::Tensor& x, const std::vector<at::Tensor>& params, double eps, at::Tensor out) {
  auto [a_h, a_w] = gates(x, params, eps, false);
  return gate(x, a_h, a_w, out);  // checks out; gates() writes nothing
}

// CA, then a 1x1 conv without bias (weight (O, C, 1, 1)), as in MobileNetV2's pw-linear layer after
// CA. The gated map is never written out: each tile of rows is gated into a buffer that stays in
// cache and multiplied by the weight from there. Gating as a pass of its own reads and writes
// the whole map once more, and the conv reads it back from memory. With relu6, x is first clamped
// in place by the pooling pass (the depthwise conv's ReLU6, which then needs no pass of its own).
at::Tensor forward_project(const at::Tensor& x, const std::vector<at::Tensor>& params, double eps,
                           const at::Tensor& projection, bool relu6) {
  auto [a_h, a_w] = gates(x, params, eps, relu6);
  const at::Tensor weight = projection.contiguous();
  check(weight, "weight", 4);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), o = weight.size(0);
  TORCH_CHECK(weight.size(1) == c && weight.size(2) == 1 && weight.size(3) == 1,
              "the projection must be a 1x1 conv from ", c, " channels");
  at::Tensor out = at::empty({n, o, h, w}, x.options());
  const int64_t row_bytes = c * w * static_cast<int64_t>(sizeof(float));
  const int64_t rows = std::clamp<int64_t>(kTileBytes / row_bytes, 1, h);
  const float *src = x.data_ptr<float>(), *gh = a_h.data_ptr<float>(), *gw = a_w.data_ptr<float>();
  const float* wt = weight.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  // Threads split the N * H rows evenly (whole tiles per thread would leave one idle for part of
  // the time: 32 rows in tiles of 7 make 5 tiles), then walk their share a tile at a time.
  at::parallel_for(0, n * h, grain(row_bytes / sizeof(float)), [&](int64_t begin, int64_t end) {
    float* buffer = scratch(c * rows * w);
    for (int64_t start = begin; start < end;) {
      const int64_t b = start / h, i0 = start % h, r = std::min({rows, end - start, h - i0}), cols = r * w;
      for (int64_t ch = 0; ch < c; ++ch) {
        const int64_t p = b * c + ch;
        const float* g = gw + p * w;
        for (int64_t i = 0; i < r; ++i) {
          const float* row = src + (p * h + i0 + i) * w;
          float* tile = buffer + ch * cols + i * w;
          const float s = gh[p * h + i0 + i];
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) tile[j] = (row[j] * s) * g[j];
        }
      }
      // out[b][:, rows i0 .. i0 + r] (O x cols, row stride h * w) = weight (O x C) @ buffer (C x cols)
      matmul(o, cols, c, wt, buffer, dst + b * o * h * w + i0 * w, h * w);
      start += r;
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("strip_means", &strip_means, "row and column means of an NCHW float32 map, in one read", py::arg("x"),
        py::arg("relu6") = false);
  m.def("gate", &gate, "x * a_h * a_w into out, one read and one write");
  m.def("forward", &forward, "the CA block at inference into out");
  m.def("forward_project", &forward_project, "[ReLU6 in place,] the CA block at inference, then a 1x1 conv without bias",
        py::arg("x"), py::arg("params"), py::arg("eps"), py::arg("projection"), py::arg("relu6") = false);
}
