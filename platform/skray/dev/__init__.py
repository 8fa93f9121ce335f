"""The harness: an embedded S3 server and Ray head, generated and bundled images, the demo."""
