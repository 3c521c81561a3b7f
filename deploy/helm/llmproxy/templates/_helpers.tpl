{{/* The chart's name, or nameOverride. */}}
{{- define "llmproxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name, used for every object: fullnameOverride, else the
release name when it already contains the chart name, else release-chart.
*/}}
{{- define "llmproxy.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "llmproxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The standard labels, on every object. */}}
{{- define "llmproxy.labels" -}}
helm.sh/chart: {{ include "llmproxy.chart" . }}
{{ include "llmproxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: proxy
app.kubernetes.io/part-of: llmproxy
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the pods: never change them in an upgrade. */}}
{{- define "llmproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmproxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llmproxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llmproxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "llmproxy.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The Secret holding the API keys, or "" when there is none. */}}
{{- define "llmproxy.secretName" -}}
{{- if and .Values.apiKeys.existingSecret .Values.apiKeys.create }}
{{- fail "apiKeys: set existingSecret or create, not both" }}
{{- end }}
{{- if .Values.apiKeys.existingSecret }}
{{- .Values.apiKeys.existingSecret }}
{{- else if .Values.apiKeys.create }}
{{- printf "%s-api-keys" (include "llmproxy.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
The port of a host:port listen address from the proxy's config, as the proxy
reads it; called with (list address default).
*/}}
{{- define "llmproxy.port" -}}
{{- $address := index . 0 | default "" | toString }}
{{- $port := regexFind "[0-9]+$" $address }}
{{- if and $address (not (regexMatch ":[0-9]+$" $address)) }}
{{- fail (printf "config.server: listen address %q has no :port" $address) }}
{{- end }}
{{- $port | default (index . 1) }}
{{- end }}

{{- define "llmproxy.proxyPort" -}}
{{- include "llmproxy.port" (list (dig "server" "listen" "" .Values.config) 8080) }}
{{- end }}

{{- define "llmproxy.adminPort" -}}
{{- include "llmproxy.port" (list (dig "server" "admin_listen" "" .Values.config) 9090) }}
{{- end }}

{{/*
config.server.drain_grace in whole seconds, rounded up, read the way the proxy
reads durations: 250ms, 30s, 2m, 1h or a plain number of seconds; 30 when unset.
*/}}
{{- define "llmproxy.drainGraceSeconds" -}}
{{- $raw := dig "server" "drain_grace" 30 .Values.config }}
{{- $text := toString $raw | trim }}
{{- $pattern := "^([0-9]+(\\.[0-9]+)?)\\s*(ms|s|m|h)?$" }}
{{- if not (regexMatch $pattern $text) }}
{{- fail (printf "config.server.drain_grace: expected a duration such as 30s or 2m, got %q" $text) }}
{{- end }}
{{- $number := regexReplaceAll $pattern $text "${1}" | float64 }}
{{- $unit := regexReplaceAll $pattern $text "${3}" }}
{{- $scale := get (dict "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 "" 1.0) $unit }}
{{- mulf $number $scale | ceil | int }}
{{- end }}

{{/*
Long enough for the preStop sleep, the whole drain and a margin; an explicit
value that would cut the drain short is refused.
*/}}
{{- define "llmproxy.terminationGracePeriodSeconds" -}}
{{- $needed := add (int .Values.preStopSleepSeconds) (include "llmproxy.drainGraceSeconds" . | int) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $needed (int .Values.shutdownMarginSeconds) }}
{{- else if le (int .Values.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + config.server.drain_grace (%d)" (int .Values.terminationGracePeriodSeconds) $needed) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* The rendered config.yaml, shared by the ConfigMap and its checksum. */}}
{{- define "llmproxy.configYaml" -}}
{{- toYaml .Values.config }}
{{- end }}
