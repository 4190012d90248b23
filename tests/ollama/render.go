// Renders an Ollama Modelfile TEMPLATE for a chat as Ollama does (its template/template.go: Execute after
// collate): every system message joined into .System and kept in .Messages, consecutive messages of one
// role merged; .Tools and a message's .ToolCalls as Ollama passes them, and its `json` template function.
// Reads {"template": ..., "messages": [{"role", "content", "tool_calls"}], "tools": [...]} on stdin, prints
// the prompt. Used by tests/test_gguf.py; Go's text/template is the engine Ollama's templates run on.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type function struct {
	Name      string         `json:"name"`
	Arguments map[string]any `json:"arguments"`
}

type call struct {
	Function function `json:"function"`
}

type message struct {
	Role      string `json:"role"`
	Content   string `json:"content"`
	ToolCalls []call `json:"tool_calls"`
}

func main() {
	var input struct {
		Template string           `json:"template"`
		Messages []message        `json:"messages"`
		Tools    []map[string]any `json:"tools"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		panic(err)
	}
	var system []string
	var collated []*message
	for i := range input.Messages {
		m := input.Messages[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == m.Role {
			collated[len(collated)-1].Content += "\n\n" + m.Content
		} else {
			collated = append(collated, &m)
		}
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	values := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": collated, "Prompt": "",
		"Response": "", "Tools": input.Tools}
	if err := template.Must(template.New("").Option("missingkey=zero").Funcs(funcs).Parse(input.Template)).Execute(
		os.Stdout, values); err != nil {
		panic(err)
	}
}
