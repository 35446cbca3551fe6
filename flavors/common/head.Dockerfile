# Prepended by the pipeline to every flavor's Dockerfile (pipeline/image.py compose()).
# BASE_IMAGE comes from flavor.yaml base.ref (or its bootstrap); TOOLKIT_IMAGE is the
# flavor's packages merged into one content-tagged image.
ARG BASE_IMAGE
ARG TOOLKIT_IMAGE
FROM ${TOOLKIT_IMAGE} AS toolkit

