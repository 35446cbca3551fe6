"""The cloud-config stage runner (cos-setup): yip-format documents and #cloud-config."""
