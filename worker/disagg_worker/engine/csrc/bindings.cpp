// The Python module of the CPU kernels (built by disagg_worker.engine.cpu_kernels).
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "paged decode attention over the KV pool");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension");
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x in place, then RMSNorm of the residual");
  m.def("rotary", &rotary, "rotary position embedding");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
}
