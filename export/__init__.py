"""Export: checkpoint -> ONNX graphs -> bundle (and TensorRT engines). Needs torch and onnx."""
