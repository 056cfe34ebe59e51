"""What a trial measures: data, training, compression, export and measurement.

Plain PyTorch and onnxruntime; nothing here knows about Optuna.
"""
