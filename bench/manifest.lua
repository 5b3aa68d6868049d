-- wrk script for the manifest scenario: every request asks for a manifest
-- with the Accept header a registry client sends (OCI and Docker types).
-- Usage: wrk -t2 -c32 -d5s -s bench/manifest.lua http://mirror/v2/bench/small/manifests/v1
wrk.method = "GET"
wrk.headers["Accept"] = table.concat({
  "application/vnd.oci.image.manifest.v1+json",
  "application/vnd.oci.image.index.v1+json",
  "application/vnd.docker.distribution.manifest.v2+json",
  "application/vnd.docker.distribution.manifest.list.v2+json",
}, ", ")
wrk.headers["User-Agent"] = "stowage-bench-wrk"
