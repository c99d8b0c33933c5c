{{/* The release's full name, within 63 characters. */}}
{{- define "recops.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "recops.labels" -}}
app.kubernetes.io/name: recops-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: recops
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "recops.selectorLabels" -}}
app.kubernetes.io/name: recops-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "recops.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "recops.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* image reference: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "recops.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* Whether the prometheus-operator's kinds are served (monitoring.enabled: auto), or forced. */}}
{{- define "recops.monitoring" -}}
{{- if eq (toString .Values.monitoring.enabled) "auto" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor" -}}true{{- end -}}
{{- else if .Values.monitoring.enabled -}}true{{- end -}}
{{- end -}}
