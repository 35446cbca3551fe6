
# Appended by the pipeline to every flavor's Dockerfile (pipeline/image.py compose()):
# the toolkit, then /boot/vmlinuz + a generic /boot/initrd, then the flavor's overlay,
# and last the cheap branding layer, so a new version rebuilds only that.
COPY --from=toolkit / /
RUN /usr/lib/cos/setup-image
COPY overlay/ /
# the flavor's upgrade channel (/etc/cos/upgrade.yaml); it changes rarely, before branding
ARG COS_UPGRADE_REPOSITORY
ARG COS_UPGRADE_TAGS
RUN /usr/lib/cos/write-channel
ARG COS_FLAVOR
ARG COS_VERSION
RUN /usr/lib/cos/brand
