{{/* Names, labels and the derived addresses every template shares. */}}

{{- define "tessera.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Kept to 40 characters so "<fullname>-coordinator-headless" stays a valid 63-char DNS label. */}}
{{- define "tessera.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tessera.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tessera.labels" -}}
helm.sh/chart: {{ include "tessera.chart" . }}
{{ include "tessera.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "tessera.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tessera.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "coordinator"). */}}
{{- define "tessera.componentSelectorLabels" -}}
{{ include "tessera.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tessera.coordinator.fullname" -}}
{{- printf "%s-coordinator" (include "tessera.fullname" .) }}
{{- end }}

{{- define "tessera.coordinator.headless" -}}
{{- printf "%s-coordinator-headless" (include "tessera.fullname" .) }}
{{- end }}

{{- define "tessera.worker.fullname" -}}
{{- printf "%s-worker" (include "tessera.fullname" .) }}
{{- end }}

{{- define "tessera.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tessera.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tessera.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "tessera.pullImage" -}}
{{- $repo := default .Values.image.repository .Values.model.pull.image.repository }}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.model.pull.image.tag }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{/* Stable DNS name of coordinator ordinal i (call with (dict "ctx" $ "i" 0)), without port. */}}
{{- define "tessera.coordinator.host" -}}
{{- printf "%s-%d.%s.%s.svc.%s" (include "tessera.coordinator.fullname" .ctx) (int .i) (include "tessera.coordinator.headless" .ctx) .ctx.Release.Namespace .ctx.Values.clusterDomain }}
{{- end }}

{{/* Every coordinator: "1=host0:clusterPort,2=host1:clusterPort,..." — Raft id = ordinal + 1, as
`--id auto` computes. The voters there should be (the scale hook's --voters). */}}
{{- define "tessera.coordinator.peers" -}}
{{- $peers := list }}
{{- range $i := until (int .Values.coordinator.replicas) }}
{{- $peers = append $peers (printf "%d=%s:%d" (add $i 1) (include "tessera.coordinator.host" (dict "ctx" $ "i" $i)) (int $.Values.coordinator.clusterPort)) }}
{{- end }}
{{- join "," $peers }}
{{- end }}

{{/* --peers of every coordinator: node 1 alone founds the cluster; every other pod asks it to
be added (so a scale-up needs nothing but more pods). Constant, whatever the replicas: a change
of coordinator.replicas never changes what a pod founds. */}}
{{- define "tessera.coordinator.founder" -}}
{{- printf "1=%s:%d" (include "tessera.coordinator.host" (dict "ctx" $ "i" 0)) (int .Values.coordinator.clusterPort) }}
{{- end }}

{{/* Every coordinator's cluster port, host:port, comma-separated (the scale hook's --endpoint). */}}
{{- define "tessera.coordinator.endpoints" -}}
{{- $eps := list }}
{{- range $i := until (int .Values.coordinator.replicas) }}
{{- $eps = append $eps (printf "%s:%d" (include "tessera.coordinator.host" (dict "ctx" $ "i" $i)) (int $.Values.coordinator.clusterPort)) }}
{{- end }}
{{- join "," $eps }}
{{- end }}

{{/* --coordinator for workers: every coordinator's cluster port; the worker follows the leader. */}}
{{- define "tessera.coordinator.urls" -}}
{{- $urls := list }}
{{- range $i := until (int .Values.coordinator.replicas) }}
{{- $urls = append $urls (printf "http://%s:%d" (include "tessera.coordinator.host" (dict "ctx" $ "i" $i)) (int $.Values.coordinator.clusterPort)) }}
{{- end }}
{{- join "," $urls }}
{{- end }}

{{/* The model volume (mounted at model.home, i.e. TESSERA_HOME). */}}
{{- define "tessera.modelVolume" -}}
- name: model
{{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required when model.source is pvc" .Values.model.pvc.claimName }}
    readOnly: true
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.model.pull.sizeLimit }}
{{- end }}
- name: tmp
  emptyDir: {}
{{- end }}

{{- define "tessera.modelMount" -}}
- name: model
  mountPath: {{ .Values.model.home }}
{{- if eq .Values.model.source "pvc" }}
  readOnly: true
{{- with .Values.model.pvc.subPath }}
  subPath: {{ . }}
{{- end }}
{{- end }}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* The init container that pulls the model (model.source = pull). */}}
{{- define "tessera.modelPullInit" -}}
{{- if eq .Values.model.source "pull" }}
initContainers:
  - name: model-pull
    image: {{ include "tessera.pullImage" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    args: ["model", "pull", {{ .Values.model.name | quote }}]
    env:
      - name: TESSERA_HOME
        value: {{ .Values.model.home | quote }}
      # pip writes its cache and build files under HOME; the root filesystem is read-only.
      - name: HOME
        value: /tmp
    securityContext:
      {{- toYaml .Values.securityContext | nindent 6 }}
    {{- with .Values.model.pull.resources }}
    resources:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    volumeMounts:
      {{- include "tessera.modelMount" . | nindent 6 }}
{{- end }}
{{- end }}

{{/* gRPC probes on the standard health service; call with (dict "p" .probes "port" N "service" S). */}}
{{- define "tessera.probes" -}}
startupProbe:
  grpc:
    port: {{ .port }}
    service: {{ .service | quote }}
  periodSeconds: {{ .p.startup.periodSeconds }}
  failureThreshold: {{ .p.startup.failureThreshold }}
  timeoutSeconds: {{ .p.startup.timeoutSeconds }}
readinessProbe:
  grpc:
    port: {{ .port }}
    service: {{ .readinessService | default .service | quote }}
  periodSeconds: {{ .p.readiness.periodSeconds }}
  failureThreshold: {{ .p.readiness.failureThreshold }}
  timeoutSeconds: {{ .p.readiness.timeoutSeconds }}
livenessProbe:
  grpc:
    port: {{ .port }}
    service: {{ .service | quote }}
  periodSeconds: {{ .p.liveness.periodSeconds }}
  failureThreshold: {{ .p.liveness.failureThreshold }}
  timeoutSeconds: {{ .p.liveness.timeoutSeconds }}
{{- end }}

{{/* Pod anti-affinity preset merged with user affinity; call with (dict "ctx" $ "component" C "v" values). */}}
{{- define "tessera.affinity" -}}
{{- $aff := deepCopy (default dict .v.affinity) }}
{{- $term := dict "labelSelector" (dict "matchLabels" (fromYaml (include "tessera.componentSelectorLabels" (dict "ctx" .ctx "component" .component)))) "topologyKey" .v.antiAffinityTopologyKey }}
{{- if hasKey $aff "podAntiAffinity" }}
{{- /* The user's own podAntiAffinity wins over the preset. */}}
{{- else if eq .v.podAntiAffinity "preferred" }}
{{- $_ := set $aff "podAntiAffinity" (dict "preferredDuringSchedulingIgnoredDuringExecution" (list (dict "weight" 100 "podAffinityTerm" $term))) }}
{{- else if eq .v.podAntiAffinity "required" }}
{{- $_ := set $aff "podAntiAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (list $term)) }}
{{- end }}
{{- if $aff }}
affinity:
  {{- toYaml $aff | nindent 2 }}
{{- end }}
{{- end }}

{{/* OTEL_EXPORTER_OTLP_ENDPOINT from otlp.endpoint; nothing when it is empty (no span export). */}}
{{- define "tessera.otlpEnv" -}}
{{- with .Values.otlp.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
Mutual TLS on the cluster protocol. The certificates are mounted at /var/lib/tessera/certs
under the names `tessera certs` gives them, each pod getting only what it needs: the CA
certificate and, for coordinators, every coordinator's certificate and key (a StatefulSet's pods
share one template; each picks its own by --id), for workers the one worker certificate, for the
scale hook (component "admin") the operator's.
*/}}
{{- define "tessera.clusterTls.dir" -}}/var/lib/tessera/certs{{- end }}

{{- define "tessera.clusterTls.secure" -}}
{{- if ne .Values.clusterTls.mode "insecure" }}true{{ end }}
{{- end }}

{{/* The Secret cert-manager fills for coordinator `.i` (1-based) or the workers (`.i` = 0). */}}
{{- define "tessera.clusterTls.certSecret" -}}
{{- if eq (int .i) 0 }}
{{- printf "%s-worker-tls" (include "tessera.fullname" .ctx) }}
{{- else }}
{{- printf "%s-coordinator-%d-tls" (include "tessera.fullname" .ctx) (int .i) }}
{{- end }}
{{- end }}

{{/* The projected volume of `.component`'s certificates; empty in insecure mode. */}}
{{- define "tessera.clusterTls.volume" -}}
{{- $ctx := .ctx }}
{{- $t := $ctx.Values.clusterTls }}
{{- if ne $t.mode "insecure" }}
- name: cluster-tls
  projected:
    # Readable by the pod's fsGroup (the tessera user), by no one else.
    defaultMode: 0440
    sources:
{{- if eq $t.mode "secret" }}
      - secret:
          name: {{ $t.secret.name | quote }}
          items:
            - key: ca.pem
              path: ca.pem
{{- if eq .component "coordinator" }}
{{- range $i := until (int $ctx.Values.coordinator.replicas) }}
            - key: coordinator-{{ add1 $i }}.pem
              path: coordinator-{{ add1 $i }}.pem
            - key: coordinator-{{ add1 $i }}.key
              path: coordinator-{{ add1 $i }}.key
{{- end }}
{{- else if eq .component "admin" }}
            - key: admin-{{ $t.adminName }}.pem
              path: admin-{{ $t.adminName }}.pem
            - key: admin-{{ $t.adminName }}.key
              path: admin-{{ $t.adminName }}.key
{{- else }}
            - key: worker-{{ $t.workerName }}.pem
              path: worker-{{ $t.workerName }}.pem
            - key: worker-{{ $t.workerName }}.key
              path: worker-{{ $t.workerName }}.key
{{- end }}
{{- else }}
{{- if eq .component "coordinator" }}
{{- range $i := until (int $ctx.Values.coordinator.replicas) }}
      - secret:
          name: {{ include "tessera.clusterTls.certSecret" (dict "ctx" $ctx "i" (add1 $i)) }}
          items:
            {{- if eq $i 0 }}
            - key: ca.crt
              path: ca.pem
            {{- end }}
            - key: tls.crt
              path: coordinator-{{ add1 $i }}.pem
            - key: tls.key
              path: coordinator-{{ add1 $i }}.key
{{- end }}
{{- else if eq .component "admin" }}
      - secret:
          name: {{ printf "%s-admin-tls" (include "tessera.fullname" $ctx) }}
          items:
            - key: ca.crt
              path: ca.pem
            - key: tls.crt
              path: admin-{{ $t.adminName }}.pem
            - key: tls.key
              path: admin-{{ $t.adminName }}.key
{{- else }}
      - secret:
          name: {{ include "tessera.clusterTls.certSecret" (dict "ctx" $ctx "i" 0) }}
          items:
            - key: ca.crt
              path: ca.pem
            - key: tls.crt
              path: worker-{{ $t.workerName }}.pem
            - key: tls.key
              path: worker-{{ $t.workerName }}.key
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tessera.clusterTls.mount" -}}
{{- if ne .Values.clusterTls.mode "insecure" }}
- name: cluster-tls
  mountPath: {{ include "tessera.clusterTls.dir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The cluster protocol's flags: the certificate directory, or the explicit opt-out. */}}
{{- define "tessera.clusterTls.args" -}}
{{- if eq .Values.clusterTls.mode "insecure" }}
# No TLS on the cluster protocol (clusterTls.mode=insecure): debugging on a private network only.
- --insecure-cluster
{{- else }}
- --certs={{ include "tessera.clusterTls.dir" . }}
{{- end }}
{{- end }}
