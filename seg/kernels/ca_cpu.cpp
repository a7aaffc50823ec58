// Coordinate Attention's two full-size steps for CPU inference, one pass over the map each.
//
// PyTorch needs two passes to pool (x.mean(3), x.mean(2)) and two to gate (x * a_h, then * a_w),
// and each pass over an early MobileNetV2 map (96 x 256 x 256 floats, 25 MB) runs from memory,
// not cache. Here one (n, c) plane is pooled, or gated, while it is in cache: one read to pool,
// one read and one write to gate. Planes are independent, so they are split across threads.
//
// Built on first use by seg/kernels/cpu.py. Float32, NCHW-contiguous only; the caller checks.

#include <torch/extension.h>

#include <ATen/Parallel.h>

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

// Planes per parallel task: enough work per task that the thread hand-off stays negligible.
int64_t grain(int64_t plane) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(plane, 1)); }

// Row means into mean_h[p * stride_h + i] and column means into mean_w[p * stride_w + j] for every
// plane p of x, reading x once.
void pool(const at::Tensor& x, float* mean_h, int64_t stride_h, float* mean_w, int64_t stride_w) {
  const int64_t h = x.size(2), w = x.size(3);
  const float* src = x.data_ptr<float>();
  const float inv_w = 1.0f / static_cast<float>(w), inv_h = 1.0f / static_cast<float>(h);
  at::parallel_for(0, x.size(0) * x.size(1), grain(h * w), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* plane = src + p * h * w;
      float* col = mean_w + p * stride_w;
      std::fill(col, col + w, 0.0f);
      int64_t i = 0;
      // Four rows per sweep: the column sums are loaded and stored once per four rows.
      for (; i + 4 <= h; i += 4) {
        const float* r0 = plane + i * w;
        const float* r1 = r0 + w;
        const float* r2 = r1 + w;
        const float* r3 = r2 + w;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t j = 0; j < w; ++j) {
          s0 += r0[j];
          s1 += r1[j];
          s2 += r2[j];
          s3 += r3[j];
          col[j] += (r0[j] + r1[j]) + (r2[j] + r3[j]);
        }
        mean_h[p * stride_h + i] = s0 * inv_w;
        mean_h[p * stride_h + i + 1] = s1 * inv_w;
        mean_h[p * stride_h + i + 2] = s2 * inv_w;
        mean_h[p * stride_h + i + 3] = s3 * inv_w;
      }
      for (; i < h; ++i) {
        const float* row = plane + i * w;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < w; ++j) {
          sum += row[j];
          col[j] += row[j];
        }
        mean_h[p * stride_h + i] = sum * inv_w;
      }
      for (int64_t j = 0; j < w; ++j) col[j] *= inv_h;
    }
  });
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

}  // namespace

// Row means (N, C, H) and column means (N, C, W) of x (N, C, H, W), reading x once.
std::vector<at::Tensor> strip_means(const at::Tensor& x) {
  check(x, "x", 4);
  at::Tensor mean_h = at::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  at::Tensor mean_w = at::empty({x.size(0), x.size(1), x.size(3)}, x.options());
  pool(x, mean_h.data_ptr<float>(), x.size(2), mean_w.data_ptr<float>(), x.size(3));
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

// The whole CA block at inference, into out (which may be x): pool, then conv1 with BN folded
// in (w1 (K, C), b1 (K, 1)) and hard-swish, then conv_h / conv_w (wh, ww (C, K); bh, bw (C, 1))
// and sigmoid, then the gate. One call instead of a dozen small Python-dispatched ops; the
// small matmuls go straight to addmm on 2-D slices, skipping matmul's batch broadcasting.
at::Tensor forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& wh,
                   const at::Tensor& bh, const at::Tensor& ww, const at::Tensor& bw, at::Tensor out) {
  check(x, "x", 4);
  check(out, "out", 4);
  TORCH_CHECK(out.sizes() == x.sizes(), "out must have x's shape");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == c && wh.sizes() == ww.sizes() && wh.size(0) == c &&
                  wh.size(1) == w1.size(0), "CA weights do not fit ", c, " channels");
  // Each plane's strips side by side, [H row means | W column means]: conv1 then acts on both
  // with one matmul, as the reference's conv1 on cat([x_h, x_w]) does.
  at::Tensor pooled = at::empty({n, c, h + w}, x.options());
  float* strips = pooled.data_ptr<float>();
  pool(x, strips, h + w, strips + h, h + w);
  at::Tensor a_h = at::empty({n, c, h}, x.options());
  at::Tensor a_w = at::empty({n, c, w}, x.options());
  for (int64_t i = 0; i < n; ++i) {
    at::Tensor y = at::addmm(b1, w1, pooled[i]);  // (K, H + W)
    at::hardswish_(y);
    at::Tensor a_h_i = a_h[i], a_w_i = a_w[i];
    at::addmm_out(a_h_i, bh, wh, y.narrow(1, 0, h));
    at::addmm_out(a_w_i, bw, ww, y.narrow(1, h, w));
  }
  a_h.sigmoid_();
  a_w.sigmoid_();
  will_write(out);
  apply_gate(x, a_h.data_ptr<float>(), h, a_w.data_ptr<float>(), w, out);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("strip_means", &strip_means, "row and column means of an NCHW float32 map, in one read");
  m.def("gate", &gate, "x * a_h * a_w into out, one read and one write");
  m.def("forward", &forward, "the CA block at inference (BN folded) into out");
}
