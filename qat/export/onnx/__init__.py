"""ONNX export of the integer model (QDQ), ONNX Runtime sessions, and its parity gate.

    path = export_onnx(int_model, (example,), "model.onnx")          # QDQ, checked
    report = onnx_parity_report(int_model, path, batches); report.check()

`cpu` knows the CPU kernel families (VNNI or not) and how each layer runs on them.
"""

from qat.export.onnx.export import export_onnx, ort_session, require_onnx

__all__ = ["export_onnx", "ort_session", "require_onnx"]
