"""Train the design-notes CNN with Keras and export it to a self-describing ONNX file."""
