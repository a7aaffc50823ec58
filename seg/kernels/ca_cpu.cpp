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

// Planes per parallel task: enough work per task that the thread hand-off stays negligible.
int64_t grain(int64_t plane) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(plane, 1)); }

}  // namespace

// Row means (N, C, H) and column means (N, C, W) of x (N, C, H, W), reading x once.
std::vector<at::Tensor> strip_means(const at::Tensor& x) {
  check(x, "x", 4);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  at::Tensor mean_h = at::empty({n, c, h}, x.options());
  at::Tensor mean_w = at::empty({n, c, w}, x.options());
  const float* src = x.data_ptr<float>();
  float* out_h = mean_h.data_ptr<float>();
  float* out_w = mean_w.data_ptr<float>();
  const float inv_w = 1.0f / static_cast<float>(w), inv_h = 1.0f / static_cast<float>(h);
  at::parallel_for(0, n * c, grain(h * w), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* plane = src + p * h * w;
      float* col = out_w + p * w;
      std::fill(col, col + w, 0.0f);
      for (int64_t i = 0; i < h; ++i) {
        const float* row = plane + i * w;
        float sum = 0.0f;
        // simd: lets the compiler keep several partial row sums (a reordering of fp32 adds)
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < w; ++j) {
          sum += row[j];
          col[j] += row[j];
        }
        out_h[p * h + i] = sum * inv_w;
      }
      for (int64_t j = 0; j < w; ++j) col[j] *= inv_h;
    }
  });
  return {mean_h, mean_w};
}

// x * a_h[..., None] * a_w[..., None, :] into out (which may be x itself), in the reference's
// op order, so results are bit-identical to ``x * a_h * a_w`` in PyTorch.
at::Tensor gate(const at::Tensor& x, const at::Tensor& a_h, const at::Tensor& a_w, at::Tensor out) {
  check(x, "x", 4);
  check(a_h, "a_h", 3);
  check(a_w, "a_w", 3);
  check(out, "out", 4);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(a_h.size(0) == n && a_h.size(1) == c && a_h.size(2) == h, "a_h must be (N, C, H)");
  TORCH_CHECK(a_w.size(0) == n && a_w.size(1) == c && a_w.size(2) == w, "a_w must be (N, C, W)");
  TORCH_CHECK(out.sizes() == x.sizes(), "out must have x's shape");
  const float* src = x.data_ptr<float>();
  const float* gate_h = a_h.data_ptr<float>();
  const float* gate_w = a_w.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, n * c, grain(h * w), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* gw = gate_w + p * w;
      for (int64_t i = 0; i < h; ++i) {
        const float* row = src + (p * h + i) * w;
        float* row_out = dst + (p * h + i) * w;
        const float gh = gate_h[p * h + i];
#pragma omp simd
        for (int64_t j = 0; j < w; ++j) row_out[j] = (row[j] * gh) * gw[j];
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("strip_means", &strip_means, "row and column means of an NCHW float32 map, in one read");
  m.def("gate", &gate, "x * a_h * a_w into out, one read and one write");
}
