"""A loaded model answering batches: the classifier, int8 quantization, dynamic batching."""
