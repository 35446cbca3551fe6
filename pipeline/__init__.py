"""cos-pipeline: build, boot-test and publish container-based OS images."""
