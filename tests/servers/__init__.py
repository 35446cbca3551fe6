"""Local servers for the cloud tests: real emulators (moto, Azurite, fake-gcs-server)
started as processes, and small servers speaking the real REST protocols where no
emulator exists (Azure ARM, GCE Compute), plus a recording/fault-injecting proxy.
All listen on 127.0.0.1 on free ports."""
