{{/* Names ----------------------------------------------------------------------------------- */}}

{{- define "strongroom.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "strongroom.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<component>"; call with (dict "root" $ "component" "keybroker") */}}
{{- define "strongroom.componentName" -}}
{{- printf "%s-%s" (include "strongroom.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels ---------------------------------------------------------------------------------- */}}

{{- define "strongroom.selectorLabels" -}}
app.kubernetes.io/name: {{ include "strongroom.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "strongroom.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "strongroom.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: strongroom
{{- end -}}

{{/* Images ---------------------------------------------------------------------------------- */}}

{{/* (dict "image" .Values.image "default" "0.1.0" "suffix" "") -> repository:tag or repository@digest */}}
{{- define "strongroom.imageRef" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s%s" .image.repository (default .default .image.tag) (default "" .suffix) -}}
{{- end -}}
{{- end -}}

{{/* The Strongroom image; (dict "root" $ "softhsm" true) selects the DEVELOPMENT HSM image. */}}
{{- define "strongroom.image" -}}
{{- $suffix := ternary .root.Values.image.softhsmTagSuffix "" (default false .softhsm) -}}
{{- include "strongroom.imageRef" (dict "image" .root.Values.image "default" .root.Chart.AppVersion "suffix" $suffix) -}}
{{- end -}}

{{/* Security -------------------------------------------------------------------------------- */}}

{{- define "strongroom.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* (dict "add" (list "NET_BIND_SERVICE")) to keep a capability in the bounding set. */}}
{{- define "strongroom.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
  {{- with .add }}
  add: {{ toJson . }}
  {{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Identity and endpoints ------------------------------------------------------------------ */}}

{{- define "strongroom.spiffeId" -}}
{{- printf "spiffe://%s/%s" .root.Values.trustDomain .component -}}
{{- end -}}

{{/* DNS names of a service's certificate: short, namespaced and fully qualified. */}}
{{- define "strongroom.dnsNames" -}}
{{- $svc := .service -}}
{{- $ns := .root.Release.Namespace -}}
{{- toJson (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .root.Values.clusterDomain)) -}}
{{- end -}}

{{- define "strongroom.caURL" -}}
{{- if .Values.pki.caURL -}}
{{- .Values.pki.caURL -}}
{{- else -}}
{{- printf "https://%s:%d" .Values.stepCa.service.name (int .Values.stepCa.service.port) -}}
{{- end -}}
{{- end -}}

{{- define "strongroom.authz" -}}
{{- $root := . -}}
authz:
{{- range $role := list "publisher" "admin" "inference" "client" }}
  {{ $role }}: {{ toJson (default (list (printf "spiffe://%s/%s" $root.Values.trustDomain $role)) (index $root.Values.authz $role)) }}
{{- end }}
{{- end -}}

{{/* The sections every service's config.yaml shares. (dict "root" $ "component" "keybroker" "service" "keybroker") */}}
{{- define "strongroom.commonConfig" -}}
service: {{ .component }}
mode: {{ .root.Values.mode }}
listen: 0.0.0.0:7443
health_listen: 0.0.0.0:8081
identity:
  trust_domain: {{ .root.Values.trustDomain }}
  spiffe_id: {{ include "strongroom.spiffeId" . }}
  dns_names: {{ include "strongroom.dnsNames" (dict "root" .root "service" .service) }}
  ca_url: {{ include "strongroom.caURL" .root }}
  ca_root_file: /run/strongroom/pki/root_ca.crt
  token_file: /run/strongroom/bootstrap/{{ .component }}.token
  # A subdirectory the service creates (0700, its own): the emptyDir's root belongs to root.
  state_dir: /var/lib/strongroom/identity/state
logging:
  level: {{ .root.Values.logging.level }}
  format: {{ .root.Values.logging.format }}
{{- with .root.Values.observability.otlpEndpoint }}
tracing:
  otlp_endpoint: {{ . }}
{{- end }}
{{ include "strongroom.authz" .root }}
{{- end -}}

{{/* Pod parts shared by the three services -------------------------------------------------- */}}

{{/*
Health probes on the plaintext gRPC health port. Readiness is the overall status (every service of
the process ready: the HSM reachable, the configured models loaded). Liveness asks for `live`:
`strongroom.Liveness` is SERVING whenever the process serves at all, so that an HSM outage or a
model that cannot load marks the pod unready instead of restarting it in a loop.
(dict "live" "strongroom.Liveness" "liveFailures" 3)
*/}}
{{- define "strongroom.probes" -}}
{{- $live := dict "port" 8081 -}}
{{- with .live }}{{ $_ := set $live "service" . }}{{ end -}}
startupProbe:
  grpc: {{ toJson $live }}
  periodSeconds: 5
  failureThreshold: 120
livenessProbe:
  grpc: {{ toJson $live }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: {{ default 3 .liveFailures }}
readinessProbe:
  grpc: {port: 8081}
  periodSeconds: 5
  timeoutSeconds: 5
  failureThreshold: 2
{{- end -}}

{{/* strongroom.runtime.process.SERVICE_ENV, in every service's container (the argument is the
service's name): no per-thread malloc caches, one arena, gRPC's classic TCP endpoints (its
EventEngine ones lose memory under load): steady memory; for inference, malloc also asks for
transparent huge pages (model loads are bound by first touches of fresh memory). */}}
{{- define "strongroom.processEnv" -}}
- {name: GLIBC_TUNABLES, value: {{ ternary "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1" "glibc.malloc.tcache_count=0" (eq . "inference") | quote }}}
- {name: MALLOC_ARENA_MAX, value: "1"}
- {name: GRPC_EXPERIMENTS, value: "-event_engine_listener"}
{{- end -}}

{{- define "strongroom.containerPorts" -}}
- name: grpc
  containerPort: 7443
  protocol: TCP
- name: health
  containerPort: 8081
  protocol: TCP
{{- end -}}

{{/*
Init container that prepares a service pod: copies Secret files into memory as 0600 files owned by the
service user, and mints the pod's one-time enrolment token from the service's own provisioner Secret
(pki.provisionerSecrets.<component>, mounted in this container only; its provisioner issues only this
service's identity). (dict "root" $ "component" "keybroker" "service" "keybroker" "copy" "src=dst ..." "mounts" (list ...))
*/}}
{{- define "strongroom.bootstrapInitContainer" -}}
- name: bootstrap
  image: {{ include "strongroom.image" (dict "root" .root) }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  command: ["bash", "/etc/strongroom/scripts/pod-init.sh"]
  env:
    - name: COPY_FILES
      value: {{ default "" .copy | quote }}
    - name: PROVISIONER_SRC
      value: /run/strongroom/provisioner
    - name: PROVISIONER_FILES
      value: {{ include "strongroom.provisionerPairs" .root | quote }}
    - name: TOKEN_FILE
      value: /run/strongroom/bootstrap/{{ .component }}.token
    - name: TOKEN_SPIFFE_ID
      value: {{ include "strongroom.spiffeId" . | quote }}
    - name: TOKEN_DNS
      value: {{ include "strongroom.dnsNames" (dict "root" .root "service" .service) | fromJsonArray | join " " | quote }}
    - name: TOKEN_LIFETIME
      value: {{ .root.Values.pki.tokenLifetime | quote }}
  securityContext:
    {{- include "strongroom.containerSecurityContext" dict | nindent 4 }}
  resources:
    requests: {cpu: 10m, memory: 64Mi}
    limits: {cpu: 500m, memory: 256Mi}
  volumeMounts:
    - {name: scripts, mountPath: /etc/strongroom/scripts, readOnly: true}
    - {name: provisioner, mountPath: /run/strongroom/provisioner, readOnly: true}
    - {name: bootstrap, mountPath: /run/strongroom/bootstrap}
    - {name: init-tmp, mountPath: /tmp}
    {{- with .mounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{- define "strongroom.provisionerPairs" -}}
{{- $pairs := list -}}
{{- range .Values.pki.provisionerFiles -}}
{{- $pairs = append $pairs (printf "%s=%s" .key .path) -}}
{{- end -}}
{{- join " " $pairs -}}
{{- end -}}

{{/* The Secret of a service's own provisioner; each service must have its own. (dict "root" $ "component" "keybroker") */}}
{{- define "strongroom.provisionerSecret" -}}
{{- $secrets := .root.Values.pki.provisionerSecrets -}}
{{- $own := index $secrets .component -}}
{{- range $service, $name := $secrets -}}
{{- if and (ne $service $.component) (eq $name $own) -}}
{{- fail (printf "pki.provisionerSecrets: %s and %s share the Secret %s; each service needs its own (its provisioner issues only its identity)" $.component $service $name) -}}
{{- end -}}
{{- end -}}
{{- $own -}}
{{- end -}}

{{/* Volumes every service pod has. */}}
{{- define "strongroom.commonVolumes" -}}
- name: config
  configMap:
    name: {{ include "strongroom.componentName" . }}
- name: scripts
  configMap:
    name: {{ include "strongroom.fullname" .root }}-scripts
    defaultMode: 0444
- name: provisioner
  secret:
    secretName: {{ include "strongroom.provisionerSecret" . }}
    defaultMode: 0440
    items:
      {{- range .root.Values.pki.provisionerFiles }}
      - {key: {{ .key | quote }}, path: {{ .key | quote }}}
      {{- end }}
- name: pki
  secret:
    secretName: {{ include "strongroom.provisionerSecret" . }}
    defaultMode: 0444
    items:
      - {key: {{ .root.Values.pki.rootCertificateKey | quote }}, path: root_ca.crt}
- name: bootstrap
  emptyDir: {medium: Memory, sizeLimit: 1Mi}
- name: identity
  emptyDir: {medium: Memory, sizeLimit: 1Mi}
- name: tmp
  emptyDir: {medium: Memory, sizeLimit: 64Mi}
- name: init-tmp
  emptyDir: {medium: Memory, sizeLimit: 1Mi}
{{- end -}}

{{/* Mounts every service container has. */}}
{{- define "strongroom.commonMounts" -}}
- {name: config, mountPath: /etc/strongroom/config.yaml, subPath: config.yaml, readOnly: true}
- {name: pki, mountPath: /run/strongroom/pki, readOnly: true}
- {name: bootstrap, mountPath: /run/strongroom/bootstrap, readOnly: true}
- {name: identity, mountPath: /var/lib/strongroom/identity}
- {name: tmp, mountPath: /tmp}
{{- end -}}

{{/* Pod template annotations: roll the pods when their configuration changes. */}}
{{- define "strongroom.podAnnotations" -}}
checksum/config: {{ include (print .root.Template.BasePath "/configmaps.yaml") .root | sha256sum }}
checksum/scripts: {{ .root.Files.Get "files/pod-init.sh" | sha256sum }}
{{- end -}}

{{/* Spread replicas over nodes and zones when there is more than one. */}}
{{- define "strongroom.topologySpread" -}}
{{- if gt (int .replicas) 1 }}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "strongroom.selectorLabels" . | nindent 8 }}
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "strongroom.selectorLabels" . | nindent 8 }}
{{- end }}
{{- end -}}

{{/*
The largest inference fleet the chart allows (R of the derived limits), as a number: with
autoscaling, the HPA's maxReplicas; else the fixed inference.replicas. Every inference replica has
the one inference SPIFFE ID, so per-identity limits sized for fewer replicas than the HPA may make
refuse the replicas it adds under load (TOO_MANY_*_PER_IDENTITY) exactly while they start.
*/}}
{{- define "strongroom.inferenceFleet" -}}
{{- $inf := .Values.inference -}}
{{- if $inf.autoscaling.enabled -}}{{ int $inf.autoscaling.maxReplicas }}{{- else -}}{{ int $inf.replicas }}{{- end -}}
{{- end -}}

{{/* The value the fleet's bound comes from, for messages: "inference.replicas 3" or
"inference.autoscaling.maxReplicas 20". */}}
{{- define "strongroom.inferenceFleetSource" -}}
{{- if .Values.inference.autoscaling.enabled -}}inference.autoscaling.maxReplicas{{- else -}}inference.replicas{{- end -}}
{{- printf " %s" (include "strongroom.inferenceFleet" .) -}}
{{- end -}}

{{/*
The model store's gRPC limits (its configuration's server section), as JSON: each value the
operator left null is derived from the largest inference fleet (R, strongroom.inferenceFleet).
Every inference replica has the one inference SPIFFE ID, so the per-identity limits are the whole
fleet's. The bound on the data-plane
workers one identity holds across kinds (maxDataPlaneWorkersPerIdentity) follows the larger of the
fleet's two per-kind caps, not their sum: a fleet's downloads and its quick unary calls peak at
different moments, and what exceeds it is refused TOO_MANY_WORKERS_PER_IDENTITY, which the
inference loader retries; at R = 1 it is the service's own default (13 of 28, so two callers at it
leave a worker for a third); past that the workers grow with it so that 15 data-plane workers
remain beside the fleet at its bound; the totals grow with them so
that the fleet cannot take every blocking stream or every data-plane worker, and the workers
reserved for the control plane (deletes, key-slot replacement, health) stay out of everyone's
reach (values.yaml, modelstore.server). Refuses what the store would refuse at start
(strongroom.runtime.config.ServerConfig).

With more than one replica each certificate holds at most half the fleet's streams
(max_streams_per_certificate, strongroom.runtime.callers.certificate_share): one replica whose
downloads stalled held them all, and every other replica's loads were refused. One replica loads
its models with 4 part fetches x 2 models at once = 8 streams, so the cap is then at least 16, for
a share of at least 8. Each certificate also holds at most half the identity's data-plane bound
(max_calls_per_certificate), its blocking streams and unary calls together: with the stream share
alone, one replica held its 8 stalled downloads and 8 unary waits beside them, the whole bound of
16, and every other replica's loads were refused TOO_MANY_WORKERS_PER_IDENTITY. One replica's
load is 8 streams + a few unary calls (a StatModel or two per model): 12, so the bound is then at
least 24, for a share of at least 12, and the unary cap at least the bound, so that one
certificate's unary calls (at most its share) leave the others half of that cap too
(deploy/README.md, "Model store limits").
*/}}
{{- define "strongroom.modelstoreServer" -}}
{{- $s := .Values.modelstore.server -}}
{{- $replicas := include "strongroom.inferenceFleet" . | int -}}
{{- $fleet := mul 2 $replicas -}}
{{- $reserve := include "strongroom.controlPlaneWorkers" $s | int -}}
{{- $least := 8 -}}
{{- $leastUnary := 13 -}}
{{- if gt $replicas 1 -}}{{- $least = 16 -}}{{- $leastUnary = 24 -}}{{- end -}}
{{- $streams := int (default (max $least $fleet) $s.maxStreamsPerIdentity) -}}
{{- $unary := int (default (max $leastUnary $fleet) $s.maxUnaryCallsPerIdentity) -}}
{{- $bound := int (default (max 13 $unary $streams) $s.maxDataPlaneWorkersPerIdentity) -}}
{{- $blocking := int (default (max 16 (add $streams 8)) $s.maxBlockingStreams) -}}
{{- $workers := int (default (max 32 (add $blocking $reserve 12) (add $bound $reserve 15)) $s.maxWorkers) -}}
{{- if gt $workers 1024 -}}
{{- fail (printf "modelstore.server: %d worker threads needed (maxBlockingStreams %d + controlPlaneWorkers %d + 12, maxDataPlaneWorkersPerIdentity %d + controlPlaneWorkers + 15; derived from %s where not set) but the store allows at most 1024: set modelstore.server.maxStreamsPerIdentity / maxUnaryCallsPerIdentity / maxDataPlaneWorkersPerIdentity lower, or run more model store replicas and set them per replica" $workers $blocking $reserve $bound (include "strongroom.inferenceFleetSource" .)) -}}
{{- end -}}
{{- if not (lt $blocking $workers) -}}
{{- fail (printf "modelstore.server.maxBlockingStreams (%d) must be below maxWorkers (%d): streams must never hold every worker thread" $blocking $workers) -}}
{{- end -}}
{{- include "strongroom.checkWorkerShares" (list "modelstore" $workers $reserve $unary $bound) -}}
{{- /* Every blocking stream may be an upload (each publisher identity has maxStreamsPerIdentity
too, and only maxBlockingStreams bounds them all), holding its message of up to what gRPC takes
before the store refuses it MESSAGE_TOO_LARGE: the store's limit, 4 MiB + 64 KiB, and the 64 KiB
cap above it (README, "Limits": model store message; MessageLimits.receive_cap), 4 MiB + 128 KiB;
and, with the s3 backend, the part it buffers (storage.part_size, 16 MiB). */ -}}
{{- $perStream := 4325376 -}}
{{- $what := "an upload's message of up to 4 MiB + 128 KiB (the store's limit and gRPC's 64 KiB cap above it)" -}}
{{- if eq .Values.modelstore.storage.backend "s3" -}}
{{- $perStream = add $perStream 16777216 -}}
{{- $what = "an upload's message of up to 4 MiB + 128 KiB (the store's limit and gRPC's 64 KiB cap above it) and its 16 MiB S3 part" -}}
{{- end -}}
{{- include "strongroom.checkConcurrencyMemory" (dict "root" . "service" "modelstore" "count" $blocking "counted" "maxBlockingStreams" "per" $perStream "what" $what "waysOut" "set modelstore.server.maxBlockingStreams lower (at least maxStreamsPerIdentity + 1: the fleet's downloads), or run more model store replicas and set the limits per replica") -}}
{{- $server := dict "max_workers" $workers "control_plane_workers" $reserve "max_blocking_streams" $blocking "max_streams_per_identity" $streams "max_unary_calls_per_identity" $unary "max_data_plane_workers_per_identity" $bound -}}
{{- if gt $replicas 1 -}}
{{- $_ := set $server "max_streams_per_certificate" (max 2 (div $streams 2)) -}}
{{- $_ := set $server "max_calls_per_certificate" (max 2 (div $bound 2)) -}}
{{- end -}}
{{- toJson $server -}}
{{- end -}}

{{/*
The key broker's gRPC limits, as JSON, likewise: every inference replica's releases (a challenge,
then the release, for each model it loads at once) are calls of the one inference identity.
Streams keep the service's defaults (the broker's only stream is health Watch, whose wait for its
message is all that holds a worker), so the bound across kinds follows the unary cap.
*/}}
{{- define "strongroom.keybrokerServer" -}}
{{- $s := .Values.keybroker.server -}}
{{- $reserve := include "strongroom.controlPlaneWorkers" $s | int -}}
{{- $unary := int (default (max 13 (mul 2 (include "strongroom.inferenceFleet" . | int))) $s.maxUnaryCallsPerIdentity) -}}
{{- $bound := int (default (max 13 $unary) $s.maxDataPlaneWorkersPerIdentity) -}}
{{- $workers := int (default (max 32 (add $bound $reserve 15)) $s.maxWorkers) -}}
{{- if gt $workers 1024 -}}
{{- fail (printf "keybroker.server: %d worker threads needed (maxDataPlaneWorkersPerIdentity %d + controlPlaneWorkers %d + 15; derived from %s where not set) but the broker allows at most 1024: set keybroker.server.maxUnaryCallsPerIdentity / maxDataPlaneWorkersPerIdentity lower" $workers $bound $reserve (include "strongroom.inferenceFleetSource" .)) -}}
{{- end -}}
{{- include "strongroom.checkWorkerShares" (list "keybroker" $workers $reserve $unary $bound) -}}
{{- /* Every worker may hold a request of up to what gRPC takes before the broker refuses it
MESSAGE_TOO_LARGE: its 256 KiB message bound and the 64 KiB cap above it (README, "Limits": key
broker message; MessageLimits.receive_cap). */ -}}
{{- include "strongroom.checkConcurrencyMemory" (dict "root" . "service" "keybroker" "count" $workers "counted" "maxWorkers" "per" 327680 "what" "a request of up to 320 KiB (the broker's 256 KiB limit and gRPC's 64 KiB cap above it)" "waysOut" "set keybroker.server.maxUnaryCallsPerIdentity / maxDataPlaneWorkersPerIdentity lower") -}}
{{- $server := dict "max_workers" $workers "control_plane_workers" $reserve "max_unary_calls_per_identity" $unary "max_data_plane_workers_per_identity" $bound -}}
{{- /* A fleet of inference replicas shares one SPIFFE ID and so the bound: one replica stalling
its releases held it all and every other replica's release was refused (README, "Limits"). Each
certificate then holds at most half of it (strongroom.runtime.callers.certificate_share); one
replica alone keeps the whole bound, as a client of one certificate does by default. */ -}}
{{- if gt (include "strongroom.inferenceFleet" . | int) 1 -}}
{{- $_ := set $server "max_calls_per_certificate" (max 2 (div $bound 2)) -}}
{{- end -}}
{{- toJson $server -}}
{{- end -}}

{{/*
The key broker's grant budget of the inference SPIFFE ID (keybroker.releaseBudget.identity), as
JSON: a value the operator left null is derived from the largest inference fleet (R,
strongroom.inferenceFleet) and its models (M: the start-up models listed in inference.models, at
least 4). Every replica releases one key per model it loads, all as the one identity: a fixed 1,024
refused a cold start of more than 256 replicas x 4 models (RELEASES_RATE_LIMITED, retried until
the rate let them through), while the unary-call limits beside it grew with R. So the burst holds
a cold start of the whole fleet, R x M (at least 1,024), and the rate the fleet reloading every
model every minute, R x M / 60 rounded up (at least 8); the burst at most the broker's 1,000,000.
*/}}
{{- define "strongroom.identityReleaseBudget" -}}
{{- $set := .Values.keybroker.releaseBudget.identity -}}
{{- $loads := mul (include "strongroom.inferenceFleet" . | int) (max 4 (len .Values.inference.models)) -}}
{{- $burst := default (min 1000000 (max 1024 $loads)) $set.burst -}}
{{- $rate := default (max 8 (div (add $loads 59) 60)) $set.rate -}}
{{- toJson (dict "burst" $burst "rate" $rate) -}}
{{- end -}}

{{/*
Refuses a service whose memory limit cannot hold what its gRPC limits admit at once: count
streams or workers (derived from the largest inference fleet where not set) each holding per
bytes, beside 64 MiB for the process itself (less than either holds at rest: the broker 87.6 MiB,
README). Limits derived from a large inference.autoscaling.maxReplicas admitted hundreds of them
into the chart's default limit, and the first burst got the pod OOM-killed, taking every
download or release in flight with it, where the service would have refused the excess
RESOURCE_EXHAUSTED. A lower bound, so only what cannot fit is refused; leave room above it.
(dict root service count counted per what waysOut)
*/}}
{{- define "strongroom.checkConcurrencyMemory" -}}
{{- $resources := get .root.Values .service | dig "resources" dict -}}
{{- $memory := dig "limits" "memory" nil $resources -}}
{{- if not (kindIs "invalid" $memory) -}}
{{- $need := add 67108864 (mul .count .per) -}}
{{- $limit := include "strongroom.quantityBytes" $memory | float64 -}}
{{- if lt $limit (float64 $need) -}}
{{- $mib := div (add $need 1048575) 1048576 -}}
{{- fail (printf "%s.resources.limits.memory (%v) cannot hold what %s.server admits at once: %s %d (derived from %s where not set), each holding %s, need %d MiB with the process's own 64 MiB, so a burst of them would get the pod OOM-killed instead of refused RESOURCE_EXHAUSTED. Raise %s.resources.limits.memory (and requests.memory) to at least %dMi, %s, or lower %s" .service $memory .service .counted .count (include "strongroom.inferenceFleetSource" .root) .what $mib .service $mib .waysOut (include "strongroom.inferenceFleetSource" .root | splitList " " | first)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
A server section's request_wait_seconds line, when requestWaitSeconds is set (null: none, each
method's own bound; a number, not an integer: the range above renders integers only).
*/}}
{{- define "strongroom.requestWait" -}}
{{- if not (kindIs "invalid" .requestWaitSeconds) -}}
request_wait_seconds: {{ .requestWaitSeconds }}
{{- end -}}
{{- end -}}

{{/*
A server section's controlPlaneWorkers: the workers only control-plane calls may use (null: 4, the
service's own default at 32 workers; 0 is a value, not null, so `default` cannot read it).
*/}}
{{- define "strongroom.controlPlaneWorkers" -}}
{{- if kindIs "invalid" .controlPlaneWorkers -}}4{{- else -}}{{ int .controlPlaneWorkers }}{{- end -}}
{{- end -}}

{{/*
Refuses worker shares the service would refuse at start: (service workers reserve unary bound).
*/}}
{{- define "strongroom.checkWorkerShares" -}}
{{- $service := index . 0 -}}
{{- $workers := index . 1 -}}
{{- $reserve := index . 2 -}}
{{- $unary := index . 3 -}}
{{- $bound := index . 4 -}}
{{- if not (lt $reserve $workers) -}}
{{- fail (printf "%s.server.controlPlaneWorkers (%d) must be below maxWorkers (%d): data-plane calls need a worker too" $service $reserve $workers) -}}
{{- end -}}
{{- $data := sub $workers $reserve -}}
{{- if not (or (eq $unary 1) (lt $unary $data)) -}}
{{- fail (printf "%s.server.maxUnaryCallsPerIdentity (%d) must be below the data-plane workers (maxWorkers %d - controlPlaneWorkers %d = %d): one caller must never hold every data-plane worker thread" $service $unary $workers $reserve $data) -}}
{{- end -}}
{{- if not (or (eq $bound 1) (lt $bound $data)) -}}
{{- fail (printf "%s.server.maxDataPlaneWorkersPerIdentity (%d) must be below the data-plane workers (maxWorkers %d - controlPlaneWorkers %d = %d): one caller must never hold every data-plane worker thread" $service $bound $workers $reserve $data) -}}
{{- end -}}
{{- end -}}

{{/* Values checks the schema cannot word precisely ----------------------------------------- */}}

{{/*
Refuses values that would render a deployment which cannot work, with a message naming the ways
out (a JSON-schema rule would only say which property failed). Included by keybroker.yaml.

The broker's collateral: with fetch on (and a writable cache), the broker's egress policy must
let it reach pcsUrl/kdsUrl. The chart cannot pick those addresses (the vendors' services sit behind
CDNs whose addresses change; most clusters reach them through a PCCS or mirror of their own), so an
empty list is a choice left open, not a safe default: every release would be refused
COLLATERAL_MISSING until someone found the cause. Without the chart's policies (networkPolicy
.enabled: false) the chart cannot see the egress rules, so it does not guess.

A read-only cache (collateral.readOnly) is another writer's: only a shared claim can be that; a
read-only per-pod emptyDir stays empty for ever.

An external CA (stepCa.enabled: false) is reached only through pki.externalCAEgress: empty, no
service could enrol (every pod stuck in its start-up, each logging the same connection error).

Turning the chart's policies off in production: only with networkPolicy.externallyEnforced, the
operator's statement that something else enforces the documented flows (otherwise nothing would,
and nothing would say so).
*/}}
{{- /* A Kubernetes quantity (the schema's pattern: digits, an optional fraction, an optional
suffix) as a float64 number of bytes. A number in YAML is a float64 already. */ -}}
{{- define "strongroom.quantityBytes" -}}
{{- if kindIs "string" . -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" . -}}
{{- $suffix := trimPrefix $number . -}}
{{- $scale := dict "" 1.0 "m" 0.001 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "Ei" 1152921504606846976.0 -}}
{{- mulf (float64 $number) (get $scale $suffix) -}}
{{- else -}}
{{- float64 . -}}
{{- end -}}
{{- end -}}

{{- /* Inference autoscaling: what the schema cannot compare (draft-07 has no comparison of two
values). The floor is inference.replicas; an explicit minReplicas saying another number is
refused rather than one of them silently ignored; a floor above the ceiling is an HPA the API
server refuses (and limits sized for a fleet the HPA would never reach). */ -}}
{{- define "strongroom.checkAutoscaling" -}}
{{- $inf := .Values.inference -}}
{{- $as := $inf.autoscaling -}}
{{- if $as.enabled -}}
{{- $max := int $as.maxReplicas -}}
{{- if not (kindIs "invalid" $as.minReplicas) -}}
{{- if ne (int $as.minReplicas) (int $inf.replicas) -}}
{{- fail (printf "inference.autoscaling.minReplicas (%d) disagrees with inference.replicas (%d): with autoscaling, inference.replicas is the fleet's floor (the HPA's minReplicas; the Deployment carries no replica count). Set inference.replicas to %d, or leave minReplicas null (it then follows inference.replicas)" (int $as.minReplicas) (int $inf.replicas) (int $as.minReplicas)) -}}
{{- end -}}
{{- end -}}
{{- if gt (int $inf.replicas) $max -}}
{{- fail (printf "inference.autoscaling: the floor (minReplicas, i.e. inference.replicas: %d) is above maxReplicas (%d): the HPA would be refused by the API server, and the broker's and store's per-identity limits are sized for maxReplicas. Raise maxReplicas to at least %d or lower the floor" (int $inf.replicas) $max (int $inf.replicas)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "strongroom.checkValues" -}}
{{- include "strongroom.checkAutoscaling" . -}}
{{- /* ONNX Runtime's cap on what inference runs hold (inference.maxInferenceMemoryBytes, null:
the service's 2 GiB) and the budget of what responses hold outside it while they are built and
sent (inference.maxResponseMemoryBytes, null: the service's 1 GiB) only work below the pod's
memory limit, with room for the process and its models: a limit at or under the two gets the pod
OOM-killed by a request they were meant to refuse (RESOURCE_EXHAUSTED INFERENCE_MEMORY_EXHAUSTED,
RESPONSE_MEMORY_BUSY). 512 MiB is the least the process needs besides them (the models' own size
comes on top, which the chart cannot know). */ -}}
{{- $inf := .Values.inference -}}
{{- $memory := get $inf.resources.limits "memory" -}}
{{- if not (kindIs "invalid" $memory) -}}
{{- $cap := ternary 2147483648.0 (float64 $inf.maxInferenceMemoryBytes) (kindIs "invalid" $inf.maxInferenceMemoryBytes) -}}
{{- $responses := ternary 1073741824.0 (float64 $inf.maxResponseMemoryBytes) (kindIs "invalid" $inf.maxResponseMemoryBytes) -}}
{{- $limit := include "strongroom.quantityBytes" $memory | float64 -}}
{{- $least := addf $cap $responses 536870912.0 -}}
{{- if lt $limit $least -}}
{{- fail (printf "inference.resources.limits.memory (%v) leaves less than 512 MiB above inference.maxInferenceMemoryBytes (%.0f bytes%s) + inference.maxResponseMemoryBytes (%.0f bytes%s): a request ONNX Runtime's cap or the response budget should refuse (RESOURCE_EXHAUSTED INFERENCE_MEMORY_EXHAUSTED, RESPONSE_MEMORY_BUSY) would get the pod OOM-killed first. Set the memory limit to at least %.0f bytes (the loaded models come on top), or set inference.maxInferenceMemoryBytes or inference.maxResponseMemoryBytes lower (each at least 16777216)" $memory $cap (ternary ", the service's default" "" (kindIs "invalid" $inf.maxInferenceMemoryBytes)) $responses (ternary ", the service's default" "" (kindIs "invalid" $inf.maxResponseMemoryBytes)) $least) -}}
{{- end -}}
{{- end -}}
{{- $np := .Values.networkPolicy -}}
{{- if and (eq .Values.mode "production") (not $np.enabled) (not $np.externallyEnforced) -}}
{{- fail "networkPolicy.enabled is false in production mode: the chart would render no NetworkPolicy, so nothing would limit who reaches the key broker and the model store or where Strongroom's pods connect (the design relies on default deny in both directions, deploy/README.md \"Network flows\"). Set networkPolicy.enabled: true, or, if the cluster enforces those flows by other means (cluster-wide CNI policies, a service mesh's authorization), acknowledge it with networkPolicy.externallyEnforced: true" -}}
{{- end -}}
{{- if and $np.enabled (not .Values.stepCa.enabled) (not .Values.pki.externalCAEgress) -}}
{{- fail (printf "pki.externalCAEgress is empty while the chart's NetworkPolicies are on and the CA is external (stepCa.enabled: false, pki.caURL %s): the policies would block every service's connection to the CA, so no pod could enrol or renew its certificate. List the CA's addresses and port, e.g. pki.externalCAEgress: [{cidr: 10.20.0.10/32, port: 9000}]" .Values.pki.caURL) -}}
{{- end -}}
{{- $c := .Values.keybroker.collateral -}}
{{- if and $c.readOnly (not $c.persistence.existingClaim) -}}
{{- fail "keybroker.collateral.readOnly is true but collateral.persistence.existingClaim is empty: the cache would be the pod's own emptyDir, which starts empty and which no other writer can fill, so every key release would be refused COLLATERAL_MISSING. Name the shared PVC another writer (a fetching broker, or `strongroom attest collateral import`) fills in collateral.persistence.existingClaim, or set readOnly: false" -}}
{{- end -}}
{{- if and (not $c.fetch) (not $c.readOnly) (not $c.persistence.existingClaim) (not .Values.keybroker.allowSimulatedTee) -}}
{{- fail "keybroker.collateral.fetch is false but collateral.persistence.existingClaim is empty: the cache would be each broker pod's own emptyDir, which starts empty at every pod start, so after every restart, reschedule or upgrade every key release would be refused COLLATERAL_MISSING until someone ran `strongroom attest collateral import` in that pod again. Name a PVC that keeps the imported collateral in collateral.persistence.existingClaim (deploy/README.md, \"Attestation collateral\")" -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled $c.fetch (not $c.readOnly) (not $c.egress) -}}
{{- /* The root CA CRL's location as the broker derives it (FetchSettings.root_crl_url): with
Intel's PCS it is another host, which the egress list must cover too. */ -}}
{{- $rootCrl := $c.rootCaCrlUrl -}}
{{- if not $rootCrl -}}
{{- $rootCrl = ternary "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der" (printf "%s/sgx/certification/v4/rootcacrl" (trimSuffix "/" $c.pcsUrl)) (eq (trimSuffix "/" $c.pcsUrl) "https://api.trustedservices.intel.com") -}}
{{- end -}}
{{- fail (printf "keybroker.collateral: the broker fetches attestation collateral (collateral.fetch: true) but collateral.egress is empty, so the broker's NetworkPolicy would block every fetch from pcsUrl (%s), kdsUrl (%s) and the root CA CRL (%s) and every key release would be refused COLLATERAL_MISSING. Choose one: (1) set keybroker.collateral.egress to the addresses and port of those three (a PCCS / KDS mirror or proxy in your network, or the vendors' endpoints), e.g. [{cidr: 10.20.0.20/32, port: 443}] (deploy/helm/values-minimal.yaml shows it); or (2) set keybroker.collateral.fetch: false and fill the cache with `strongroom attest collateral import` (air-gapped; deploy/README.md, \"Attestation collateral\")" $c.pcsUrl $c.kdsUrl $rootCrl) -}}
{{- end -}}
{{- end -}}
